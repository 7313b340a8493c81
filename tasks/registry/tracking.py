"""Runs: a parent run per pipeline run, a child run per variant, deduplicated by configuration hash.

A rerun of the same configuration finds the finished child run with the same `config_hash` and reuses
it (no new run, no new model version), so the UI holds one run per distinct variant.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path

from tasks.registry.naming import experiment_name, registered_model_name

log = logging.getLogger(__name__)


def client_for(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri)


def ensure_experiment(client, base_model: str, artifact_location: str | None = None) -> str:
    name = experiment_name(base_model)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_location and "://" not in artifact_location:
        location = Path(artifact_location).resolve().as_uri()
    elif artifact_location:
        location = artifact_location
    return client.create_experiment(name, artifact_location=location, tags={"base_model": base_model})


def start_pipeline_run(tracking_uri: str, base_model: str, base_revision: str, params: dict, artifact_location: str | None = None,
                       tags: dict | None = None) -> str:
    """The parent run of one pipeline run; `tags` trace it to what started it (e.g. its Airflow DAG run:
    the model-zoo DAG and a REST trigger may run the same model side by side)."""
    client = client_for(tracking_uri)
    # A local artifact directory only goes with a local store; a tracking server decides for itself.
    if not tracking_uri.startswith(("sqlite:", "file:", "/")):
        artifact_location = None
    exp_id = ensure_experiment(client, base_model, artifact_location)
    run = client.create_run(
        exp_id,
        run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"pipeline_run": "true", "base_model": base_model, "base_revision": base_revision, **(tags or {})},
    )
    for key, value in sorted(params.items()):
        client.log_param(run.info.run_id, key, str(value)[:500])
    return run.info.run_id


def finish_pipeline_run(tracking_uri: str, run_id: str, artifacts_dir: str | Path | None = None, status: str = "FINISHED",
                        metrics: dict | None = None) -> None:  # fmt: skip
    client = client_for(tracking_uri)
    for key, value in _finite(metrics or {}).items():
        client.log_metric(run_id, key, value)
    if artifacts_dir and Path(artifacts_dir).exists():
        client.log_artifacts(run_id, str(artifacts_dir), "reports")
    client.set_terminated(run_id, status)


def find_variant_run(client, experiment_id: str, config_hash: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
        max_results=1,
        order_by=["attributes.start_time ASC"],
    )
    return runs[0] if runs else None


def _finite(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(float(v))}


def log_variant(tracking_uri: str, parent_run_id: str, variant: dict, metrics: dict, files: dict[str, str | Path],
                build_model=None) -> tuple[str, bool]:
    """Create (or reuse) the child run of a variant; return (run_id, reused).

    `variant` holds name, backend, method, budget_label, base_model, base_revision, config_hash, options.
    `files` are small artifacts (bit map, manifests) logged at the run root; `build_model(path)` writes
    the variant's MLflow model there, logged under `model/`: what the registered version points to.
    """
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    existing = find_variant_run(client, exp_id, variant["config_hash"])
    if existing is not None:
        log.info("mlflow: variant %s already recorded in run %s", variant["config_hash"], existing.info.run_id)
        return existing.info.run_id, True
    name = variant["name"]
    run = client.create_run(
        exp_id,
        run_name=name,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "config_hash": variant["config_hash"],
            "variant": name,
            "backend": variant["backend"],
            "method": variant["method"],
            "base_model": variant["base_model"],
        },
    )
    run_id = run.info.run_id
    params = {
        "backend": variant["backend"],
        "method": variant["method"],
        "budget": variant["budget_label"],
        "base_model": variant["base_model"],
        "base_revision": variant["base_revision"],
        **{f"opt_{k}": v for k, v in (variant.get("options") or {}).items()},
    }
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()],
        params=[Param(k, str(v)[:500]) for k, v in params.items()],
    )
    for path in files.values():
        if path and Path(path).exists():
            client.log_artifact(run_id, str(path))
    if build_model is not None:
        with tempfile.TemporaryDirectory(prefix="quant-model-") as tmp:
            client.log_artifacts(run_id, str(build_model(Path(tmp) / "model")), "model")
    client.set_terminated(run_id, "FINISHED")
    return run_id, False


def log_table(tracking_uri: str, run_id: str, rows: list[dict], name: str = "results.json") -> None:
    client = client_for(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(rows, indent=2, default=str))
        client.log_artifact(run_id, str(path))


__all__ = ["client_for", "start_pipeline_run", "finish_pipeline_run", "log_variant", "registered_model_name"]
