"""Honest MLflow run states: a pipeline run that fails or is killed does not stay RUNNING."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tasks.context import StageContext
from tasks.orchestration.step_table import CONF, Step
from tasks.registry.tracking import CONFIG_KEY_TAG, HOST_TAG, PID_TAG, client_for, start_pipeline_run

PARAMS = {"model": "m", "methods": ["optimal"]}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _open_child(client, parent):
    return client.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id}).info.run_id


def test_a_killed_process_run_is_ended_by_the_next_run_of_the_same_configuration(state, monkeypatch):
    uri = f"sqlite:///{state / 'mlflow.db'}"
    first = start_pipeline_run(uri, "m", "rev1", PARAMS)
    client = client_for(uri)
    parent = client.get_run(first)
    assert parent.data.tags[HOST_TAG] == socket.gethostname() and parent.data.tags[PID_TAG].isdigit()
    child = _open_child(client, parent)
    other_config = start_pipeline_run(uri, "m", "rev1", {**PARAMS, "methods": ["mxq"]})
    other_host = start_pipeline_run(uri, "m", "rev1", PARAMS)
    client.set_tag(first, PID_TAG, str(_dead_pid()))  # as if that process had been killed with SIGKILL
    client.set_tag(other_host, HOST_TAG, "some-other-node")
    client.set_tag(other_host, PID_TAG, str(_dead_pid()))

    third = start_pipeline_run(uri, "m", "rev1", PARAMS)
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    assert status(first) == "KILLED" and status(child) == "KILLED"
    assert client.get_run(first).data.tags["ended_by"].startswith("a later run")
    assert status(other_config) == "RUNNING", "another configuration is another run"
    assert status(other_host) == "RUNNING", "a process on another node cannot be checked from here"
    assert status(third) == "RUNNING"
    assert client.get_run(third).data.tags[CONFIG_KEY_TAG] == client.get_run(first).data.tags[CONFIG_KEY_TAG]


def test_only_a_later_run_of_the_same_dag_ends_an_airflow_run(state):
    uri = f"sqlite:///{state / 'mlflow.db'}"
    dag = {"airflow_dag_id": "quantization_pipeline"}
    old = start_pipeline_run(uri, "m", "rev1", PARAMS, tags={**dag, "airflow_dag_run_id": "manual__1"})
    start_pipeline_run(uri, "m", "rev1", PARAMS)  # the CLI cannot tell whether an Airflow run is alive
    client = client_for(uri)
    assert client.get_run(old).info.status == "RUNNING"
    start_pipeline_run(uri, "m", "rev1", PARAMS, tags={**dag, "airflow_dag_run_id": "manual__1"})  # prepare retried
    assert client.get_run(old).info.status == "RUNNING"
    start_pipeline_run(uri, "m", "rev1", PARAMS, tags={**dag, "airflow_dag_run_id": "manual__2"})
    assert client.get_run(old).info.status == "KILLED"


@pytest.mark.parametrize("error,status", [(RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")])
def test_the_inprocess_runner_ends_its_parent_run_when_a_step_fails(state, monkeypatch, error, status):
    from tasks.orchestration import runner

    uri = f"sqlite:///{state / 'mlflow.db'}"
    opened = {}

    def prepare(ctx, conf):
        opened["id"] = start_pipeline_run(uri, "m", "rev1", conf)
        client = client_for(uri)
        opened["child"] = _open_child(client, client.get_run(opened["id"]))
        return {"parent_run_id": opened["id"]}

    def allocate(ctx, prep):
        raise error

    table = (Step("prepare", "x:a", (CONF,)), Step("allocate", "x:b", ("prepare",)), Step("finish", "x:c", ("allocate",)))
    monkeypatch.setattr(runner, "STEPS", table)
    monkeypatch.setattr(Step, "resolve", lambda self: {"prepare": prepare, "allocate": allocate}[self.name])
    with pytest.raises(type(error)):
        runner.run_inprocess(PARAMS, ctx=StageContext.from_env())
    client = client_for(uri)
    assert client.get_run(opened["id"]).info.status == status and client.get_run(opened["child"]).info.status == status


def test_a_dag_task_that_fails_for_good_ends_the_parent_run(state):
    from tasks.orchestration.dag_factory import _policy, end_failed_run
    from tasks.orchestration.step_table import STEPS

    uri = f"sqlite:///{state / 'mlflow.db'}"
    run_id = start_pipeline_run(uri, "m", "rev1", PARAMS)

    class TI:
        def xcom_pull(self, task_ids):
            assert task_ids == "prepare"
            return {"parent_run_id": run_id}

    assert all(_policy(step)["on_failure_callback"] is end_failed_run for step in STEPS)
    end_failed_run({"ti": TI()})
    assert client_for(uri).get_run(run_id).info.status == "FAILED"
    end_failed_run({"ti": type("Empty", (), {"xcom_pull": lambda self, task_ids: None})()})  # prepare never ran: nothing to end


# ---- stage outputs: no litter, one build per key ------------------------------------------------------


def test_partials_of_dead_attempts_are_removed_and_live_ones_kept(tmp_path):
    import json
    import os
    import time

    from tasks.artifacts import OWNER, LEGACY_PARTIAL_AGE_S, StageOutput

    out = StageOutput(tmp_path, "profiling", {"model": "m"})
    parent = out.path.parent
    parent.mkdir(parents=True)
    dead, live, other_host, legacy, fresh_legacy = (parent / f".{out.key}.{n}.partial" for n in ("dead", "live", "remote", "old", "new"))
    for d in (dead, live, other_host, legacy, fresh_legacy):
        d.mkdir()
        (d / "stash.bin").write_bytes(b"x" * 1024)
    (dead / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid()}))
    (live / OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    (other_host / OWNER).write_text(json.dumps({"host": "another-node", "pid": _dead_pid()}))
    old = time.time() - LEGACY_PARTIAL_AGE_S - 60
    os.utime(legacy, (old, old))
    with out.build() as tmp:
        assert (tmp / OWNER).exists(), "an attempt says who it is"
        (tmp / "scores.csv").write_text("a\n")
    left = sorted(p.name.split(".")[2] for p in parent.glob("*.partial"))
    assert left == ["live", "new", "remote"]
    assert not (out.path / OWNER).exists() and OWNER not in out.manifest()["files"]


def test_concurrent_builders_of_one_output_compute_it_once(tmp_path):
    script = f"""
import sys, time
sys.path.insert(0, {str(__import__('tasks').__path__[0] + '/..')!r})
from tasks.artifacts import StageOutput
out = StageOutput({str(tmp_path)!r}, "profiling", {{"model": "m"}})
with out.exclusive():
    if not out.is_complete():
        with out.build() as tmp:
            with open({str(tmp_path / 'computed.log')!r}, "a") as fh:
                fh.write("x")
            time.sleep(1.0)
            (tmp / "scores.csv").write_text("a")
assert (out.path / "scores.csv").read_text() == "a"
"""
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert (tmp_path / "computed.log").read_text() == "x", "computed once; the others waited and reused it"


def test_a_run_waiting_for_another_runs_output_says_whom_it_waits_for(tmp_path, monkeypatch, caplog):
    """A lock held by a live run is waited for, and the wait is logged with the holder (not a silent hang)."""
    import logging

    from tasks import artifacts

    monkeypatch.setattr(artifacts, "LOCK_POLL_SECONDS", 0.05)
    monkeypatch.setattr(artifacts, "WAIT_LOG_SECONDS", 0.3)
    script = f"""
import sys, time
sys.path.insert(0, {str(__import__('tasks').__path__[0] + '/..')!r})
from tasks.artifacts import StageOutput
with StageOutput({str(tmp_path)!r}, "evaluation", {{"model": "m"}}).exclusive():
    print("held", flush=True)
    time.sleep(1.5)
"""
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    out = artifacts.StageOutput(tmp_path, "evaluation", {"model": "m"})
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="tasks.artifacts"), out.exclusive():
        assert time.monotonic() - started > 1.0, "entered only once the holder let go"
    assert holder.wait(timeout=60) == 0
    waits = [r.getMessage() for r in caplog.records]
    assert any(f"waiting for {socket.gethostname()} pid {holder.pid}" in m for m in waits), waits
    assert any("still waiting" in m for m in waits), waits
    assert (tmp_path / "evaluation" / f".{out.key}.lock").read_text().strip() == f"{socket.gethostname()} pid {os.getpid()}"


# ---- registration under races --------------------------------------------------------------------------


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
def test_concurrent_registrations_of_one_model_create_one_version(state, tmp_path):
    import json

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = client_for(uri)
    parent = start_pipeline_run(uri, "m", "rev1", PARAMS)
    exp = client.get_run(parent).info.experiment_id
    runs = [client.create_run(exp).info.run_id for _ in range(4)]
    script = """
import json, sys
from tasks.registry.versions import register_version
uri, run_id, root = sys.argv[1:4]
print(json.dumps(register_version(uri, "m", run_id, {"model_hash": "h1", "variant": "hqq/uniform/4.25"}, claims_root=root)))
"""
    procs = [subprocess.Popen([sys.executable, "-c", script, uri, r, str(tmp_path / "artifacts")], stdout=subprocess.PIPE, text=True)
             for r in runs]  # fmt: skip
    results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    versions = client.search_model_versions("name = 'm-quant'")
    assert len(versions) == 1, [v.version for v in versions]
    assert {v for v, _ in results} == {str(versions[0].version)} and sum(created for _, created in results) == 1
    assert (tmp_path / "artifacts" / "registry-claims").is_dir()


def test_a_dead_claim_is_taken_over(state, tmp_path):
    import json

    from tasks.registry import claims
    from tasks.registry.versions import register_version

    uri = f"sqlite:///{state / 'mlflow.db'}"
    client = client_for(uri)
    run = client.create_run(client.get_run(start_pipeline_run(uri, "m", "rev1", PARAMS)).info.experiment_id).info.run_id
    root = tmp_path / "artifacts"
    assert claims.try_claim(root, "m-quant--h2") and not claims.try_claim(root, "m-quant--h2")
    claim = root / "registry-claims" / "m-quant--h2.json"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0}))  # its run was killed
    version, created = register_version(uri, "m", run, {"model_hash": "h2"}, claims_root=str(root), wait_s=30)
    assert created and version == "1" and json.loads(claim.read_text())["pid"] != 0


def test_the_mlflow_copy_of_a_model_becomes_hard_links_to_the_stage_output(tmp_path):
    import os

    from tasks.registry.dedup import MIN_BYTES, link_duplicates, local_dir

    source, copy = tmp_path / "quantized", tmp_path / "mlflow" / "model" / "artifacts" / "checkpoint"
    source.mkdir()
    copy.mkdir(parents=True)
    weights = os.urandom(MIN_BYTES * 3)
    (source / "model.safetensors").write_bytes(weights)
    (copy / "model.safetensors").write_bytes(weights)
    (source / "config.json").write_bytes(b"{}" * MIN_BYTES)
    (copy / "config.json").write_bytes(b"[]" * MIN_BYTES)  # same size, other content (a rewritten config)
    total, shared = link_duplicates(source, copy)
    assert (total, shared) == (len(weights) + 2 * MIN_BYTES, len(weights))
    assert (copy / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert (copy / "config.json").stat().st_ino != (source / "config.json").stat().st_ino
    assert (copy / "model.safetensors").read_bytes() == weights
    assert link_duplicates(source, copy) == (total, shared), "idempotent"
    (source / "model.safetensors").unlink()  # either store can be cleaned without breaking the other
    assert (copy / "model.safetensors").read_bytes() == weights
    assert local_dir(f"file://{copy}") == copy and local_dir(str(copy)) == copy
    assert local_dir("s3://bucket/x") is None and local_dir("mlflow-artifacts:/1/abc/artifacts") is None
