"""The DAGs under a real Airflow: `airflow standalone` (SQLite, LocalExecutor, api-server on 127.0.0.1),
driven only through its REST API, as a user or a CI job would.

Checks that every DAG imports, that the model zoo triggers one quantization_pipeline run for its entry
and nothing on its second run, that invalid trigger confs are refused with a 400 before anything runs,
that a REST-triggered run of quantization_pipeline succeeds and lands in MLflow, and that a new
checkpoint seen by checkpoint_watch starts quantization_pipeline through the asset. Every process the
test starts is stopped at the end: the standalone's process group, then anything left in its session.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

CONF = {  # the reduced pipeline: baseline + one uniform 4-bit variant on the tiny checkpoint
    "backends": ["hqq"],
    "uniform_budgets": ["b4g64"],
    "methods": [],
    "budgets": [],
    "calibration_samples": 4,
    "calibration_seq_len": 128,
    "eval_tokens": 1024,
    "protocols": ["paper"],
}
ZOO_CONF = {**CONF, "lm_eval_tasks": []}  # its own config: the REST-triggered run must not mark it done
RUN_TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Airflow:
    """A running `airflow standalone` and its REST API."""

    def __init__(self, home: Path, env: dict, log: Path):
        self.home, self.env, self.log = home, env, log
        self.base = f"http://127.0.0.1:{env['AIRFLOW__API__PORT']}"
        self.proc: subprocess.Popen | None = None
        self.session = requests.Session()

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["airflow", "standalone"], env=self.env, cwd=self.home, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def wait_healthy(self, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        health: dict = {}
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"airflow standalone exited with {self.proc.returncode}:\n{self.tail()}"
            try:
                health = self.session.get(f"{self.base}/api/v2/monitor/health", timeout=5).json()
            except (requests.RequestException, ValueError):
                health = {}
            if all(health.get(part, {}).get("status") == "healthy" for part in ("metadatabase", "scheduler", "dag_processor")):
                token = self.session.get(f"{self.base}/auth/token", timeout=10).json()["access_token"]
                self.session.headers["Authorization"] = f"Bearer {token}"
                return health
            time.sleep(2)
        raise AssertionError(f"not healthy after {timeout} s: {health}\n{self.tail()}")

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, f"{self.base}/api/v2{path}", timeout=30, **kwargs)

    def wait_dags(self, dag_ids: tuple[str, ...], timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.api("GET", f"/dags/{d}").status_code == 200 for d in dag_ids):
                return
            errors = self.api("GET", "/importErrors").json()
            assert errors.get("total_entries", 0) == 0, errors
            time.sleep(2)
        raise AssertionError(f"DAGs {dag_ids} not parsed after {timeout} s\n{self.tail()}")

    def trigger(self, dag_id: str, conf: dict | None = None) -> requests.Response:
        return self.api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf or {}})

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/dags/{dag_id}/dagRuns", params={"limit": 100}).json()["dag_runs"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}").json()
            if run["state"] in ("success", "failed"):
                if run["state"] == "failed":
                    tis = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
                    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
                    raise AssertionError(f"{dag_id} {run_id} failed: {states}\n{self.tail()}")
                return run
            time.sleep(3)
        raise AssertionError(f"{dag_id} {run_id} not done after {timeout} s\n{self.tail()}")

    def stop(self) -> list[int]:
        """SIGTERM the process group, then anything left in the session (task processes run in their
        own process groups); SIGKILL what is still there after a grace period. Returns the leftovers."""
        if self.proc is None:
            return []
        sid = self.proc.pid  # start_new_session: the session and group id are the standalone's pid
        try:
            os.killpg(sid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(sid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        leftovers = session_pids(sid)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            while session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.5)
        return leftovers


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid and (entry / "stat").read_text().split()[2] != "Z":
                    pids.append(int(entry.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return pids


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """A private copy of the tiny checkpoint: the asset test changes it."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-watched"
    shutil.copytree(tiny_model_dir, path)
    return path


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("standalone")
    home, state = root / "airflow", root / "state"
    home.mkdir()
    state.mkdir()
    zoo_file = root / "zoo.yaml"
    zoo_file.write_text(json.dumps({"entries": [{"name": "tiny", "model": str(checkpoint), "watch": True, **ZOO_CONF}]}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "QUANT_", "MLFLOW_"))}
    env.update(
        AIRFLOW_HOME=str(home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="2",
        AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION="False",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS="True",
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="120",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"http://127.0.0.1:{port}/execution/",
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),
        # The log servers bind every interface (not configurable): free ports at least avoid clashes.
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(free_port()),
        QUANT_HOME=str(state),
        QUANT_CACHE_DIR=os.environ.get("QUANT_CACHE_DIR", str(REPO / ".state" / "cache")),
        MLFLOW_TRACKING_URI=f"sqlite:///{state / 'mlflow.db'}",
        QUANT_ZOO_FILE=str(zoo_file),
        # Unpaused at creation, a daily model_zoo would run the zoo's entry at once, beside the runs
        # under test (and record the same variants first): manual only here.
        QUANT_ZOO_SCHEDULE="none",
        QUANT_ZOO_POLL_SECONDS="5",
        PYTHONPATH=str(REPO),
        PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",  # standalone starts `airflow` from PATH
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="2",
    )
    server = Airflow(home, env, root / "standalone.log")
    server.state = state
    try:
        server.start()
        server.wait_healthy()
        server.wait_dags(("quantization_pipeline", "checkpoint_watch", "model_zoo"))
        yield server
    finally:
        leftovers = server.stop()
        assert not session_pids(server.proc.pid if server.proc else -1), "processes survived the shutdown"
        if leftovers:
            print(f"stopped {len(leftovers)} process(es) left after the group: {leftovers}")


def test_every_dag_imports(airflow):
    assert airflow.api("GET", "/importErrors").json()["total_entries"] == 0
    dags = {d["dag_id"]: d for d in airflow.api("GET", "/dags").json()["dags"]}
    assert {"quantization_pipeline", "model_zoo", "checkpoint_watch"} <= set(dags)
    assert not dags["quantization_pipeline"]["is_paused"]


def quantized_dirs(state: Path) -> set[str]:
    root = state / "artifacts" / "quantized"
    return {str(p.relative_to(root)) for p in root.glob("*/*") if p.is_dir()} if root.exists() else set()


def test_the_zoo_triggers_one_pipeline_run_and_the_second_zoo_run_nothing(airflow, checkpoint):
    from mlflow import MlflowClient

    def zoo_once() -> None:
        response = airflow.trigger("model_zoo")
        assert response.status_code == 200, response.text
        airflow.wait_run("model_zoo", response.json()["dag_run_id"])  # waits for the runs it triggered

    zoo_once()
    triggered = [r for r in airflow.runs("quantization_pipeline") if r["dag_run_id"].startswith("zoo__tiny__")]
    assert len(triggered) == 1 and triggered[0]["state"] == "success", triggered
    assert triggered[0]["conf"]["model"] == str(checkpoint) and triggered[0]["conf"]["lm_eval_tasks"] == []
    built = quantized_dirs(airflow.state)
    assert len(built) == 1
    client = MlflowClient(airflow.env["MLFLOW_TRACKING_URI"])
    name = f"{checkpoint.name}-quant"
    versions = {v.version for v in client.search_model_versions(f"name = '{name}'")}
    assert len(versions) == 1
    exp = client.get_experiment_by_name(f"quant/{checkpoint.name}")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_run") == "true"]
    assert [p.data.tags["airflow_dag_run_id"] for p in parents] == [triggered[0]["dag_run_id"]]

    zoo_once()
    assert len([r for r in airflow.runs("quantization_pipeline") if r["dag_run_id"].startswith("zoo__")]) == 1, "nothing new to run"
    assert quantized_dirs(airflow.state) == built
    assert {v.version for v in client.search_model_versions(f"name = '{name}'")} == versions
    assert len([r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_run") == "true"]) == 1


@pytest.mark.parametrize(
    "bad,param",
    [
        ({"methods": ["magic"]}, "methods"),
        ({"budgets": ["-3.0"]}, "budgets"),
        ({"model": None}, "model"),
        ({"model": ""}, "model"),
        ({"eval_tokens": -1}, "eval_tokens"),
    ],
)
def test_invalid_conf_is_refused_with_400_before_anything_runs(airflow, bad, param):
    before = len(airflow.runs("quantization_pipeline"))
    response = airflow.trigger("quantization_pipeline", {**CONF, **bad})
    assert response.status_code == 400, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and f"Invalid input for param {param}" in detail, detail
    assert len(airflow.runs("quantization_pipeline")) == before, "no run was created"


def test_rest_triggered_run_succeeds_and_lands_in_mlflow(airflow, checkpoint):
    from mlflow import MlflowClient

    response = airflow.trigger("quantization_pipeline", {**CONF, "model": str(checkpoint)})
    assert response.status_code == 200, response.text
    run = airflow.wait_run("quantization_pipeline", response.json()["dag_run_id"])
    assert run["state"] == "success" and run["run_type"] == "manual"

    client = MlflowClient(airflow.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"quant/{checkpoint.name}")
    runs = client.search_runs([exp.experiment_id])
    # The model_zoo DAG (daily, unpaused at creation) may run the same zoo entry meanwhile: select this
    # DAG run's parent run by the Airflow tags every parent run carries.
    parents = [r for r in runs if r.data.tags.get("pipeline_run") == "true" and r.data.tags.get("airflow_dag_run_id") == run["dag_run_id"]]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["airflow_dag_id"] == "quantization_pipeline"
    assert parents[0].data.params["model"] == str(checkpoint)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert {r.data.tags["variant"] for r in children} == {"none/unquantized/fp32", "hqq/uniform/4.25"}
    assert all(r.data.metrics["ppl_wikitext2"] > 0 for r in children)
    assert len(client.search_model_versions(f"name = '{checkpoint.name}-quant'")) == 1


def test_a_new_checkpoint_starts_the_pipeline_through_the_asset(airflow, checkpoint):
    from mlflow import MlflowClient

    def watch_once() -> None:
        response = airflow.trigger("checkpoint_watch")
        assert response.status_code == 200, response.text
        airflow.wait_run("checkpoint_watch", response.json()["dag_run_id"], timeout=300)

    watch_once()  # first sight: recorded, nothing announced
    assert not [r for r in airflow.runs("quantization_pipeline") if r["run_type"] == "asset_triggered"]
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))  # a new revision
    watch_once()

    deadline = time.monotonic() + 120
    while not (triggered := [r for r in airflow.runs("quantization_pipeline") if r["run_type"] == "asset_triggered"]):
        assert time.monotonic() < deadline, f"no asset-triggered run\n{airflow.tail()}"
        time.sleep(3)
    assert len(triggered) == 1
    airflow.wait_run("quantization_pipeline", triggered[0]["dag_run_id"])

    events = airflow.api("GET", "/assets/events", params={"source_dag_id": "checkpoint_watch"}).json()["asset_events"]
    assert len(events) == 1 and events[0]["extra"]["model"] == str(checkpoint) and events[0]["extra"]["entry"] == "tiny"
    client = MlflowClient(airflow.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(f"quant/{checkpoint.name}")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_run") == "true"]
    newest = max(parents, key=lambda r: r.info.start_time)
    assert newest.data.tags["base_revision"] == events[0]["extra"]["revision"], "the announced checkpoint was quantized"
    assert newest.data.params["eval_tokens"] == "1024", "with the zoo entry's config, not the Params' defaults"
