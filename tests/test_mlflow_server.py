"""The production-shaped registry: mlflow/serve.sh with S3 artifacts (moto's S3 server), used through HTTP.

Starts moto_server and the MLflow server on free loopback ports in their own process groups, logs a
parent and child runs by the conventions (mlflow/CONVENTIONS.md), reads them back through the server,
checks the artifact landed in the bucket, registers versions, promotes one, and screenshots the UI's
runs-comparison page in headless Chromium. Set MLFLOW_SCREENSHOT_OUT=path to keep a copy of the PNG.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.services import CHROMIUM, ServiceError, free_port, stop_group, tool, wait_http
from tasks.registry.ui import compare_url
from tests.services import chromium as _chromium

pytestmark = pytest.mark.slow  # an MLflow server, moto and a browser: whole services

REPO = Path(__file__).resolve().parent.parent
SERVE = REPO / "mlflow" / "serve.sh"
BUCKET = "mlflow-artifacts"
CREDS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
def _wait(url: str, proc, log: Path, timeout: float) -> None:
    try:
        wait_http(url, proc, log, timeout)
    except ServiceError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    pytest.importorskip("mlflow")
    boto3 = pytest.importorskip("boto3")
    moto = tool("moto_server")
    mlflow_bin = tool("mlflow")
    if not moto:
        pytest.skip("moto_server not found (pip install 'moto[server]')")
    if not mlflow_bin:
        pytest.skip("the mlflow executable is not found")
    root = tmp_path_factory.mktemp("mlflow-server")
    s3_port, mlflow_port = free_port(), free_port()
    s3_url, uri = f"http://127.0.0.1:{s3_port}", f"http://127.0.0.1:{mlflow_port}"
    env = {**os.environ, **CREDS, "MLFLOW_S3_ENDPOINT_URL": s3_url}
    started = []
    try:
        moto_log = root / "moto.log"
        with open(moto_log, "w") as fh:
            started.append(subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(s3_port)], stdout=fh,
                                            stderr=subprocess.STDOUT, env=env, start_new_session=True))
        _wait(f"{s3_url}/", started[-1], moto_log, 30)
        s3 = boto3.client("s3", endpoint_url=s3_url, **{k.lower(): v for k, v in CREDS.items() if k != "AWS_DEFAULT_REGION"},
                          region_name=CREDS["AWS_DEFAULT_REGION"])
        s3.create_bucket(Bucket=BUCKET)

        server_env = {
            **env,
            "MLFLOW_SERVER_PORT": str(mlflow_port),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'store' / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{BUCKET}/artifacts",
            "MLFLOW_CMD": mlflow_bin,
            "QUANT_HOME": str(root),
        }
        server_log = root / "mlflow.log"
        with open(server_log, "w") as fh:
            started.append(subprocess.Popen(["bash", str(SERVE)], stdout=fh, stderr=subprocess.STDOUT,
                                            env=server_env, start_new_session=True))
        _wait(f"{uri}/health", started[-1], server_log, 180)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # fail fast if the server dies
            yield {"uri": uri, "s3": s3, "root": root, "s3_url": s3_url}
    finally:
        for proc in reversed(started):
            stop_group(proc)


@pytest.fixture(scope="module")
def logged(servers, tiny_model_dir, tmp_path_factory):
    """A reduced pipeline run against the server, with the pipeline's artifact store in S3 too."""
    from mlflow import MlflowClient

    from tasks.orchestration.runner import run_inprocess

    uri, home = servers["uri"], tmp_path_factory.mktemp("pipeline-home")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {
            **CREDS,
            "MLFLOW_TRACKING_URI": uri,
            "QUANT_HOME": str(home),
            "QUANT_ARTIFACT_ROOT": f"s3://{BUCKET}/pipeline",
            "AWS_ENDPOINT_URL_S3": servers["s3_url"],
            "QUANT_S3_CACHE": str(home / "s3-mirror"),
        }.items():
            mp.setenv(key, value)
        result = run_inprocess(
            {
                "model": str(tiny_model_dir),
                "backends": ["hqq"],
                "uniform_budgets": ["b4g64", "b3g128"],
                "methods": [],
                "budgets": [],
                "calibration_samples": 4,
                "calibration_seq_len": 128,
                "eval_tokens": 1024,
                "protocols": ["paper"],
                "lm_eval_tasks": [],
            }
        )
    client = MlflowClient(uri, uri)
    exp = client.get_experiment_by_name(f"quant/{tiny_model_dir.name}")
    runs = {r.data.tags.get("variant", "parent"): r for r in client.search_runs([exp.experiment_id])}
    model = f"{tiny_model_dir.name}-quant"
    versions = {v.tags["variant"]: str(v.version) for v in client.search_model_versions(f"name='{model}'")}
    return {"client": client, "exp_id": exp.experiment_id, "parent": runs.pop("parent"), "runs": runs,
            "model": model, "versions": versions, "result": result}


def test_runs_metrics_and_artifacts_round_trip_through_the_server_into_s3(servers, logged, tmp_path):
    client, runs = logged["client"], logged["runs"]
    assert set(runs) == {"none/unquantized/fp32", "hqq/uniform/4.25", "hqq/uniform/3.13"}
    child = runs["hqq/uniform/3.13"]
    back = client.get_run(child.info.run_id)
    assert back.data.metrics["ppl_wikitext2"] > 1 and back.data.metrics["nominal_bpp"] == pytest.approx(3.127, abs=1e-3)
    assert back.data.params["method"] == "uniform" and back.data.params["budget"] == "3.13"
    assert back.data.tags["mlflow.parentRunId"] == logged["parent"].info.run_id
    assert client.get_run(logged["parent"].info.run_id).data.tags["pipeline_run"] == "true"
    assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: the client never talks to S3

    names = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"bitmap.json", "bitmap.png", "manifest.json"} <= names
    model = client.get_logged_model(client.get_run(child.info.run_id).outputs.model_outputs[0].model_id)
    assert model.artifact_location.startswith("mlflow-artifacts:")  # the logged model, proxied into S3 too
    local = client.download_artifacts(child.info.run_id, "bitmap.json", str(tmp_path))
    bitmap = json.loads(Path(local).read_text())
    assert bitmap["method"] == "uniform" and bitmap["modules"]["0.mlp.down_proj"] == {"bits": 3, "group_size": 128}

    keys = [o["Key"] for o in servers["s3"].list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    key = next((k for k in keys if child.info.run_id in k and k.endswith("/bitmap.json")), None)
    assert key and key.startswith("artifacts/"), keys
    assert json.loads(servers["s3"].get_object(Bucket=BUCKET, Key=key)["Body"].read())["modules"] == bitmap["modules"]
    # The pipeline's own artifact store lives in the same S3: every stage output with its manifest.
    stages = {k.split("/")[1] for k in keys if k.startswith("pipeline/") and k.endswith("manifest.json")}
    assert {"calibration", "quantized", "evaluation"} <= stages, stages


def test_register_and_promote_through_the_server(servers, logged):
    from tasks.registry.promotion import run_promotion

    client, model, versions = logged["client"], logged["model"], logged["versions"]
    assert set(versions) == {"hqq/uniform/4.25", "hqq/uniform/3.13"}
    size = {name: float(client.get_run(client.get_model_version(model, v).run_id).data.metrics["saved_bytes"]) for name, v in versions.items()}
    kld = {name: float(client.get_model_version(model, v).tags["kld_wikitext2"]) for name, v in versions.items()}
    within = [name for name in kld if kld[name] <= 0.35]
    pick = min(within, key=size.get) if within else min(kld, key=kld.get)
    # The pipeline's own promotion step already chose by the default rule (no cap).
    assert str(client.get_model_version_by_alias(model, "champion").version) == versions[pick]
    # Without a tolerance the closest to the base model wins whatever its size: the 4-bit model. Under a cap
    # that only the 3-bit model fits, the champion moves there, says why, and a rerun changes nothing.
    assert run_promotion(servers["uri"], model, tolerance=None)["champion"] == versions["hqq/uniform/4.25"]
    cap = int((size["hqq/uniform/4.25"] + size["hqq/uniform/3.13"]) / 2)
    moved = run_promotion(servers["uri"], model, tolerance=None, max_saved_bytes=cap)
    assert (moved["action"], moved["champion"]) == ("promote", versions["hqq/uniform/3.13"])
    assert moved["reason"] in client.get_model_version(model, moved["champion"]).description
    assert run_promotion(servers["uri"], model, tolerance=None, max_saved_bytes=cap)["action"] == "keep"
    assert len(client.search_model_versions(f"name='{model}'")) == 2


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_ui_compare_page_shows_the_runs(servers, logged, tmp_path):
    runs = logged["runs"]
    ids = [r.info.run_id for r in runs.values()]
    url = compare_url(servers["uri"], ids, [logged["exp_id"]])  # the link the pipeline prints

    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f"Comparing {len(ids)} Runs" in dom.stdout, dom.stdout[-2000:]
    for name in runs:
        assert name in dom.stdout  # every run's name is rendered in the comparison table

    png = tmp_path / "mlflow-compare.png"
    shot = _chromium("--window-size=1400,1800", f"--screenshot={png}", url, profile=tmp_path / "profile-shot")
    assert shot.returncode == 0 and png.exists() and png.stat().st_size > 20_000, shot.stderr[-2000:]
    print(f"screenshot: {png}")
    if os.environ.get("MLFLOW_SCREENSHOT_OUT"):
        out = Path(os.environ["MLFLOW_SCREENSHOT_OUT"])
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, out)
        print(f"screenshot copied to: {out}")


def _metrics_and_artifacts(client, experiment: str) -> dict:
    import mlflow.artifacts

    from tasks.registry.tracking import variant_model_id

    exp = client.get_experiment_by_name(experiment)
    out = {}
    for run in client.search_runs([exp.experiment_id]):
        if "variant" not in run.data.tags:  # the parent (and a profile's) run
            continue
        names = sorted(a.path for a in client.list_artifacts(run.info.run_id))
        model_id = variant_model_id(client, run.info.run_id)  # the logged model's files, top level
        model = sorted(a.path for a in mlflow.artifacts.list_artifacts(artifact_uri=client.get_logged_model(model_id).artifact_location)) if model_id else []
        out[run.data.tags["variant"]] = {"metrics": run.data.metrics, "artifacts": names, "model": model, "status": run.info.status}
    return out


def test_every_step_in_its_own_pod_sharing_only_s3_records_what_the_inprocess_run_records(servers, tiny_model_dir, tmp_path):
    """Production runs each step in a fresh container: an empty local disk (no model cache, no mirror of
    the artifact store), the artifact store in S3 and the MLflow server the only things it shares. Each
    step here is a `python -m tasks step` process whose QUANT_HOME is emptied before it starts (at the
    same path, as a pod's volume mount), for HQQ and for GPTQ (which reads the calibration set)."""
    import shutil

    from mlflow import MlflowClient

    from tasks.orchestration.step_table import CONF as CONF_INPUT, STEPS

    inproc_model, pod_model = tmp_path / "tiny-inprocess", tmp_path / "tiny-pods"  # two names: two experiments
    shutil.copytree(tiny_model_dir, inproc_model)
    shutil.copytree(tiny_model_dir, pod_model)
    config = {"backends": ["hqq", "gptq"], "uniform_budgets": ["b4g64"], "methods": [], "budgets": [], "calibration_samples": 4,
              "calibration_seq_len": 128, "eval_tokens": 1024, "protocols": ["paper"], "lm_eval_tasks": []}  # fmt: skip
    env = {**os.environ, **CREDS, "MLFLOW_TRACKING_URI": servers["uri"], "QUANT_ARTIFACT_ROOT": f"s3://{BUCKET}/pods",
           "AWS_ENDPOINT_URL_S3": servers["s3_url"], "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}  # fmt: skip
    env.pop("QUANT_CACHE_DIR", None)

    home = tmp_path / "inprocess-home"
    proc = subprocess.run([sys.executable, "-m", "tasks", "pipeline", "--config", json.dumps({**config, "model": str(inproc_model)})],
                          cwd=REPO, env={**env, "QUANT_HOME": str(home), "QUANT_S3_CACHE": str(home / "s3-mirror")},
                          capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    pod, xcom = tmp_path / "pod", tmp_path / "xcom"
    xcom.mkdir()

    def in_pod(step, payload, tag):
        shutil.rmtree(pod, ignore_errors=True)
        pod.mkdir()
        out = xcom / f"{tag}.json"
        run = subprocess.run([sys.executable, "-m", "tasks", "step", step, "--input", json.dumps(payload), "--output", str(out)],
                             cwd=REPO, env={**env, "QUANT_HOME": str(pod), "QUANT_S3_CACHE": str(pod / "s3-mirror")},
                             capture_output=True, text=True, timeout=900)  # fmt: skip
        assert run.returncode == 0, f"step {tag}:\n{run.stderr[-3000:]}"
        return json.loads(out.read_text())

    results = {CONF_INPUT: {**config, "model": str(pod_model)}}
    for step in STEPS:
        args = [results[name] for name in step.inputs]
        if step.mapped:
            results[step.name] = [in_pod(step.name, item, f"{step.name}-{i}") for i, item in enumerate(args[0])]
        else:
            results[step.name] = in_pod(step.name, args[0] if len(args) == 1 else args, step.name)

    client = MlflowClient(servers["uri"], servers["uri"])
    expected = _metrics_and_artifacts(client, f"quant/{inproc_model.name}")
    got = _metrics_and_artifacts(client, f"quant/{pod_model.name}")
    assert set(got) == set(expected) == {"none/unquantized/fp32", "hqq/uniform/4.25", "gptq/uniform/4.25"}
    for variant, want in expected.items():
        assert got[variant]["status"] == "FINISHED"
        assert got[variant]["artifacts"] == want["artifacts"], variant
        assert got[variant]["model"] == want["model"], variant
        assert set(got[variant]["metrics"]) == set(want["metrics"]), variant
        for key, value in want["metrics"].items():
            if not key.endswith("_seconds") and "throughput" not in key and "peak" not in key:
                assert got[variant]["metrics"][key] == pytest.approx(value, rel=1e-6), (variant, key)
    parent = client.get_run(results["finish"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert {"reports"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    versions = client.search_model_versions(f"name='{pod_model.name}-quant'")
    assert sorted(v.tags["variant"] for v in versions) == ["gptq/uniform/4.25", "hqq/uniform/4.25"]
