"""Runs: a parent run per pipeline run, a child run per variant, deduplicated by configuration hash.

A rerun of the same configuration finds the finished child run with the same `config_hash` and reuses
it (no new run, no new model version), so the UI holds one run per distinct variant.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

from tasks.artifacts import pid_alive, stable_hash
from tasks.errors import PipelineError
from tasks.registry.naming import experiment_name, registered_model_name

log = logging.getLogger(__name__)

CONFIG_KEY_TAG = "config_key"  # the pipeline config and model revision a parent run runs
HOST_TAG, PID_TAG = "owner_host", "owner_pid"  # the process that opened a parent run outside Airflow


_INITIALIZED: set[str] = set()  # SQLite stores this process has created or migrated under the lock


def client_for(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    if not tracking_uri.startswith("sqlite:///") or tracking_uri in _INITIALIZED:
        return MlflowClient(tracking_uri=tracking_uri)
    # Concurrent runs on a fresh SQLite store would each create its tables (alembic migrations race and
    # fail with "table already exists"): the first creates them under a lock, the others wait. The
    # client opens its store when constructed, so it is constructed under the lock.
    db = Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.init-lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            client._get_registry_client().store  # noqa: B018 (the registry's store migrates the same schema)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _INITIALIZED.add(tracking_uri)
    return client


def ensure_experiment(client, base_model: str, artifact_location: str | None = None, tracking_uri: str | None = None) -> str:
    """The base model's experiment, created on first use. A local artifact directory only goes with a
    local store (`tracking_uri` sqlite:/file:/path); a tracking server decides for itself."""
    if tracking_uri is not None and not tracking_uri.startswith(("sqlite:", "file:", "/")):
        artifact_location = None
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
    exp_id = ensure_experiment(client, base_model, artifact_location, tracking_uri)
    tags = {**(tags or {}), CONFIG_KEY_TAG: stable_hash({"params": params, "revision": base_revision})}
    if "airflow_dag_run_id" not in tags:  # a process of its own: who owns the run, to tell a dead one
        tags.update({HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())})
    end_stale_runs(client, exp_id, tags)
    run = client.create_run(
        exp_id,
        run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={"pipeline_run": "true", "base_model": base_model, "base_revision": base_revision, **tags},
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


PROFILE_KEY_TAG = "profile_key"


def log_profile_run(tracking_uri: str, base_model: str, base_revision: str, profile_dir: str | Path, key: str,
                    artifact_location: str | None = None) -> str:  # fmt: skip
    """The MLflow run of one profile (scores table and its summary), logged once per profile and base
    model: every pipeline run that uses the profile points to it (tag `profile_run_id`). Returns its id."""
    from tasks.artifacts import read_json

    client = client_for(tracking_uri)
    exp_id = ensure_experiment(client, base_model, artifact_location, tracking_uri)
    found = client.search_runs([exp_id], filter_string=f"tags.{PROFILE_KEY_TAG} = '{key}' and attributes.status = 'FINISHED'", max_results=1)
    if found:
        return found[0].info.run_id
    profile_dir = Path(profile_dir)
    summary = read_json(profile_dir / "profiling.json")
    run = client.create_run(exp_id, run_name=f"profile {base_revision[:12]}",
                            tags={"profile_run": "true", PROFILE_KEY_TAG: key, "base_model": base_model, "base_revision": base_revision})  # fmt: skip
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params = {k: summary[k] for k in ("samples", "seq_len", "layers", "fisher_samples", "batch_size", "normalize", "device",
                                      "rival_scores", "dkld_windows") if k in summary}
    params["rungs"] = ",".join(summary.get("rungs", []))
    metrics = {"profile_seconds": summary.get("seconds"), **{f"profile_{k}_seconds": v for k, v in summary.get("phase_seconds", {}).items()}}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()],
                     params=[Param(k, str(v)) for k, v in params.items()])  # fmt: skip
    for name in ("scores.csv", "profiling.json"):
        client.log_artifact(run.info.run_id, str(profile_dir / name))
    client.set_terminated(run.info.run_id, "FINISHED")
    log.info("mlflow: profile %s logged as run %s", key, run.info.run_id)
    return run.info.run_id


def end_pipeline_run(tracking_uri: str, run_id: str, status: str) -> None:
    """End a parent run that did not finish (FAILED or KILLED), and every child run it left open."""
    client = client_for(tracking_uri)
    _end_with_children(client, client.get_run(run_id), status)


def _end_with_children(client, run, status: str) -> None:
    children = client.search_runs([run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}' and attributes.status = 'RUNNING'")
    for child in children:
        client.set_terminated(child.info.run_id, status)
    if run.info.status == "RUNNING":
        client.set_terminated(run.info.run_id, status)
    log.info("mlflow: pipeline run %s ended as %s (%d open child run(s) with it)", run.info.run_id, status, len(children))


def end_stale_runs(client, experiment_id: str, tags: dict) -> list[str]:
    """Parent runs of the same configuration still RUNNING whose owner is gone (a process killed outright
    never ends its run): end them, and their open child runs, as KILLED. Returns their ids.

    Alive is: for a run opened by a process (host and pid tags), that process on this host (a run of
    another host is left alone); for a run opened by an Airflow DAG run, only a later run of the same
    DAG may declare it dead, and it does so, since the pipeline DAG runs one DAG run at a time
    (max_active_runs=1)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.{CONFIG_KEY_TAG} = '{tags[CONFIG_KEY_TAG]}' and attributes.status = 'RUNNING'")
    ended = []
    for run in runs:
        if not _owner_gone(run.data.tags, tags):
            continue
        _end_with_children(client, run, "KILLED")
        client.set_tag(run.info.run_id, "ended_by", "a later run of the same configuration found its owner gone")
        ended.append(run.info.run_id)
    return ended


def _owner_gone(owner: dict, current: dict) -> bool:
    if "airflow_dag_run_id" in owner:
        return owner.get("airflow_dag_id") == current.get("airflow_dag_id") and owner["airflow_dag_run_id"] != current.get("airflow_dag_run_id")
    if owner.get(HOST_TAG) != socket.gethostname() or not owner.get(PID_TAG, "").isdigit():
        return False
    return not pid_alive(int(owner[PID_TAG]))


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
                build_model=None, weights_dir: str | Path | None = None) -> tuple[str, bool]:
    """Create (or reuse) the child run of a variant; return (run_id, reused).

    `variant` holds name, backend, method, budget_label, base_model, base_revision, config_hash, options.
    `files` are small artifacts (bit map, manifests) logged at the run root; `build_model(path)` writes
    the variant's MLflow model there, logged under `model/`: what the registered version points to;
    its files identical to those of `weights_dir` (the stage output) become hard links to them where
    both are on this filesystem (tasks/registry/dedup.py), and the run records the bytes it stores.
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
    for label, path in files.items():
        if not path:
            continue
        if not Path(path).exists():  # a step that did not fetch its inputs: say so, never log a run without them
            raise PipelineError(f"{label} file {path} is missing on this machine: cannot record variant {name}")
        client.log_artifact(run_id, str(path))
    if build_model is not None:
        with tempfile.TemporaryDirectory(prefix="quant-model-") as tmp:
            client.log_artifacts(run_id, str(build_model(Path(tmp) / "model")), "model")
        _store_once(client, run_id, weights_dir)
    client.set_terminated(run_id, "FINISHED")
    return run_id, False


def _store_once(client, run_id: str, weights_dir) -> None:
    from tasks.registry.dedup import link_duplicates, local_dir

    logged = local_dir(f"{client.get_run(run_id).info.artifact_uri}/model")
    if weights_dir is None or logged is None or not logged.is_dir():
        return  # an object store: the copies stay (README, Storage)
    total, shared = link_duplicates(Path(weights_dir), logged)
    client.log_metric(run_id, "mlflow_model_bytes", total)
    client.log_metric(run_id, "stored_bytes", total - shared)  # what this version adds to the disk
    log.info("mlflow: model of %s: %.1f MiB, %.1f MiB of it shared with the stage output", run_id, total / 2**20, shared / 2**20)


def log_table(tracking_uri: str, run_id: str, rows: list[dict], name: str = "results.json") -> None:
    client = client_for(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(rows, indent=2, default=str))
        client.log_artifact(run_id, str(path))


__all__ = ["client_for", "start_pipeline_run", "finish_pipeline_run", "log_variant", "registered_model_name"]
