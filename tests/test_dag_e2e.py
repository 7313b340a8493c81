"""The quantization_pipeline DAG through real Airflow (`airflow dags test`, SQLite metadata DB) on a
tiny real checkpoint, then what reached MLflow: runs, metrics, artifacts, registered versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture
def airflow_env(state, tmp_path):
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT="120",
        QUANT_HOME=str(state),
        MLFLOW_TRACKING_URI=f"sqlite:///{state / 'mlflow.db'}",
    )
    bin_dir = Path(sys.executable).parent
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    subprocess.run(["airflow", "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return env


def dags_test(env, conf: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["airflow", "dags", "test", "quantization_pipeline", "-c", json.dumps(conf)],
        env=env, capture_output=True, text=True, timeout=900,
    )


def test_dag_runs_end_to_end_and_records_everything(airflow_env, tiny_model_dir):
    from mlflow import MlflowClient

    conf = {
        "model": str(tiny_model_dir),
        "backends": ["hqq"],
        "uniform_budgets": ["b4g64", "b3g128"],
        "methods": ["optimal"],  # so the profile's scores path travels between tasks
        "budgets": ["3.4"],
        "calibration_samples": 4,
        "calibration_seq_len": 128,
        "eval_tokens": 2048,
        "protocols": ["paper", "gptq"],
    }
    proc = dags_test(airflow_env, conf)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "state=success" in proc.stdout + proc.stderr

    client = MlflowClient(airflow_env["MLFLOW_TRACKING_URI"])
    name = tiny_model_dir.name
    exp = client.get_experiment_by_name(f"quant/{name}")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pipeline_run") == "true"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["airflow_dag_id"] == "quantization_pipeline"  # traceable to its DAG run
    assert parents[0].data.tags["airflow_dag_run_id"].startswith("manual__")
    assert {r.data.tags["variant"] for r in children} == {"none/unquantized/fp32", "hqq/uniform/4.25", "hqq/uniform/3.13", "hqq/optimal/3.40"}
    for run in children:
        m = run.data.metrics
        for key in ("ppl_wikitext2", "ppl_c4", "ppl_wikitext2_gptq", "ppl_c4_gptq", "saved_bytes", "tokens_per_s",
                    "ppl_wikitext2_se", "top1_wikitext2", "reload_ppl"):
            assert m[key] > 0, (run.data.tags["variant"], key)
    by_variant = {r.data.tags["variant"]: r for r in children}
    assert by_variant["none/unquantized/fp32"].data.metrics["kld_wikitext2"] == 0.0
    assert by_variant["hqq/uniform/3.13"].data.metrics["kld_c4_gptq"] > by_variant["hqq/uniform/4.25"].data.metrics["kld_c4_gptq"] > 0
    assert by_variant["hqq/optimal/3.40"].data.metrics["predicted_dnll"] > 0
    q4 = by_variant["hqq/uniform/4.25"]
    assert q4.data.metrics["nominal_bpp"] == pytest.approx(4.2539, abs=1e-3)
    assert q4.data.metrics["saved_bytes"] < by_variant["none/unquantized/fp32"].data.metrics["saved_bytes"]
    artifacts = {a.path for a in client.list_artifacts(q4.info.run_id)}
    assert {"bitmap.json", "bitmap.png", "manifest.json"} <= artifacts and q4.outputs.model_outputs  # and its logged model
    bitmap = json.loads(Path(client.download_artifacts(q4.info.run_id, "bitmap.json")).read_text())
    assert bitmap["modules"]["1.self_attn.o_proj"] == {"bits": 4, "group_size": 64}
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "reports")} >= {"reports/results.md"}

    versions = client.search_model_versions(f"name = '{name}-quant'")
    assert len(versions) == 3 and all(v.tags["load_check"] == "passed" for v in versions)
    for v in versions:
        for tag in ("variant", "method", "backend", "bpp", "size_mib", "kld_wikitext2", "ppl_wikitext2", "serving", "model_hash"):
            assert v.tags.get(tag), (v.version, tag)
    # The default rule: the smallest version within KLD 0.35 of the base model, else the closest.
    champion = client.get_model_version_by_alias(f"{name}-quant", "champion")
    size = {v.version: by_variant[v.tags["variant"]].data.metrics["saved_bytes"] for v in versions}
    within = [v for v in versions if float(v.tags["kld_wikitext2"]) <= 0.35]
    pick = min(within, key=lambda v: size[v.version]) if within else min(versions, key=lambda v: float(v.tags["kld_wikitext2"]))
    assert champion.version == pick.version and champion.description.startswith("**Champion**")

    # A rerun hits every cache: no new variant runs, no duplicate versions, same champion.
    again = dags_test(airflow_env, conf)
    assert again.returncode == 0, again.stdout[-3000:]
    assert len(client.search_model_versions(f"name = '{name}-quant'")) == 3
    runs2 = client.search_runs([exp.experiment_id])
    assert len([r for r in runs2 if "mlflow.parentRunId" in r.data.tags]) == 4
    assert "cache hit" in again.stdout + again.stderr
    # The profile was computed once and is one MLflow run, which both pipeline runs link to.
    profiles = [r for r in runs2 if r.data.tags.get("profile_run") == "true"]
    assert len(profiles) == 1 and {a.path for a in client.list_artifacts(profiles[0].info.run_id)} >= {"scores.csv", "profiling.json"}
    assert {r.data.tags.get("profile_run_id") for r in runs2 if r.data.tags.get("pipeline_run") == "true"} == {profiles[0].info.run_id}
    assert client.get_model_version_by_alias(f"{name}-quant", "champion").version == champion.version


@pytest.mark.parametrize(
    "bad",
    [{"methods": ["magic"]}, {"budgets": ["-3.0"]}, {"model": ""}, {"eval_tokens": -1}],
)
def test_invalid_trigger_conf_is_rejected_by_param_validation(airflow_env, bad):
    proc = dags_test(airflow_env, bad)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Invalid input for param" in out or "ParamValidationError" in out, out[-2000:]
    assert "[DAG TEST] starting task_id" not in out  # rejected before any task ran
