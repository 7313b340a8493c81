"""Registered versions are MLflow models: after a pipeline run, the champion loads with
`mlflow.pyfunc.load_model` in a fresh process and generates text; the downloaded version holds the
tokenizer and a model card; transformers refuses a checkpoint it cannot read instead of returning
random weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a pipeline run and three fresh Python processes

REPO = Path(__file__).resolve().parent.parent
CONF = {"backends": ["hqq"], "uniform_budgets": ["b4g64"], "methods": [], "budgets": [], "calibration_samples": 4, "calibration_seq_len": 128,
        "eval_tokens": 1024, "protocols": ["paper"], "lm_eval_tasks": []}  # fmt: skip


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_model_dir):
    """One pipeline run (HQQ b4g64) in a private state directory; returns (state, env, registered model name)."""
    from tests.services import pipeline_in_own_state

    state = tmp_path_factory.mktemp("mlflow-model-state")
    return state, pipeline_in_own_state(state, {**CONF, "model": str(tiny_model_dir)}), f"{tiny_model_dir.name}-quant"


def in_fresh_process(env: dict, code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_the_champion_loads_with_pyfunc_in_a_fresh_process_and_generates(registered):
    state, env, name = registered
    code = (
        "import json, mlflow; "
        f"m = mlflow.pyfunc.load_model('models:/{name}@champion'); "
        "out = m.predict(['The capital of France is'], params={'max_new_tokens': 5}); "
        "print(json.dumps(out))"
    )
    out = json.loads(in_fresh_process(env, code))
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str) and out[0].strip(), out


def test_the_version_directory_has_the_tokenizer_a_card_and_no_silent_random_weights(registered):
    state, env, name = registered
    code = f"import mlflow; print(mlflow.artifacts.download_artifacts('models:/{name}@champion'))"
    root = Path(in_fresh_process(env, code))
    assert (root / "MLmodel").is_file()
    card = (root / "README.md").read_text()
    assert "hqq" in card and "b4g64" in card and "WikiText-2 perplexity" in card and "mlflow.pyfunc.load_model" in card
    checkpoint = root / "artifacts" / "checkpoint"
    assert {"tokenizer.json", "bitmap.json", "metrics.json", "config.json"} <= {p.name for p in checkpoint.iterdir()}
    probe = (
        "from transformers import AutoModelForCausalLM\n"
        "try:\n"
        f"    AutoModelForCausalLM.from_pretrained({str(checkpoint)!r})\n"
        "    print('loaded')\n"
        "except Exception as exc:\n"
        "    print('refused: ' + str(exc).splitlines()[0])\n"
    )
    assert in_fresh_process(env, probe).startswith("refused"), "transformers must not return random weights for HQQ"


def test_mlflow_serves_the_champion(registered):
    """`mlflow models serve -m models:/<name>@champion --env-manager local` answers a generation request;
    the server and its workers are stopped afterwards."""
    import os
    import signal
    import socket
    import time

    import requests

    state, env, name = registered
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"},  # its uvicorn, as in an activated venv
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(2)
        response = requests.post(f"http://127.0.0.1:{port}/invocations", timeout=120,
                                 json={"inputs": ["The capital of France is"], "params": {"max_new_tokens": 5}})  # fmt: skip
        assert response.status_code == 200, response.text
        predictions = response.json()["predictions"]
        assert len(predictions) == 1 and isinstance(predictions[0], str) and predictions[0].strip()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_the_store_holds_what_the_conventions_say(registered):
    """Logged models linked to their runs and versions, the fixed version tags, the bit map's heat map on
    the variant run, real run durations, the champion's reason in its description, the shared runs view."""
    from mlflow import MlflowClient

    from tasks.registry.load_check import DETAIL_TAG, TAG
    from tasks.registry.naming import BITMAP_JSON, BITMAP_PNG, experiment_name
    from tasks.registry.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, KEY_PREFIX
    from tasks.registry.ui import SHARED_VIEW_TAG_PREFIX
    from tasks.registry.versions import VERSION_TAGS, version_model_id

    state, env, name = registered
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    versions = client.search_model_versions(f"name='{name}'")
    assert versions
    for v in versions:
        assert set(v.tags) <= {*VERSION_TAGS, TAG, DETAIL_TAG} and {"variant", "bpp", "size_mib", "model_hash"} <= set(v.tags)
        model = client.get_logged_model(version_model_id(v))  # the version was made from its run's logged model
        assert model.source_run_id == v.run_id and model.status == "READY"
        assert {"name": name, "version": v.version} in json.loads(model.tags["mlflow.modelVersions"])
        assert {m.key for m in model.metrics} >= {f"{KEY_PREFIX}bpp", f"{KEY_PREFIX}size_mib", f"{KEY_PREFIX}kld_wikitext2"}
        run = client.get_run(v.run_id)
        assert {a.path for a in client.list_artifacts(v.run_id)} >= {BITMAP_JSON, BITMAP_PNG}
        quant_ms = 1000 * run.data.metrics["quant_seconds"]
        assert run.info.end_time - run.info.start_time >= quant_ms > 0  # the run spans its quantize step
        assert v.description.startswith("**Champion**") == (v.version == client.get_model_version_by_alias(name, "champion").version)
    exp = client.get_experiment_by_name(experiment_name(name.removesuffix("-quant")))
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("pipeline_run") == "true")
    assert SHARED_VIEW_TAG_PREFIX + parent.info.run_id in exp.tags
    assert "Champion:" in parent.data.tags["mlflow.note.content"] and "workflowType=machine_learning" in parent.data.tags["mlflow.note.content"]


def test_the_reload_check_rejects_a_corrupted_version(registered):
    """A version whose weights no longer load fails its check, says why, and cannot be champion."""
    from mlflow import MlflowClient

    from tasks.registry.load_check import check_version
    from tasks.registry.promotion import run_promotion

    state, env, name = registered
    client = MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias(name, "champion")
    assert version.tags["load_check"] == "passed" and "within" in version.tags["load_check_detail"]
    from tasks.registry.dedup import local_dir

    stored = local_dir(client.get_model_version_download_uri(name, version.version)) / "artifacts" / "checkpoint" / "model.safetensors"
    stored.write_bytes(stored.read_bytes()[: stored.stat().st_size // 2])  # truncated, as a failed upload leaves it
    calibration = next(Path(state, "artifacts", "calibration").glob("*/"))
    result = check_version(env["MLFLOW_TRACKING_URI"], name, version.version, str(calibration), 1024, float(version.tags["ppl_wikitext2"]))
    assert not result["passed"] and result["detail"].startswith("does not reload")
    tags = client.get_model_version(name, version.version).tags
    assert tags["load_check"] == "failed" and tags["load_check_detail"] == result["detail"][:500]
    decision = run_promotion(env["MLFLOW_TRACKING_URI"], name)
    assert decision["action"] == "demote" and "failed" in decision["reason"], decision
    assert "champion" not in client.get_registered_model(name).aliases, "a version that fails is never champion"
    assert len(client.search_model_versions(f"name='{name}'")) == 1, "nothing deleted but the alias"
