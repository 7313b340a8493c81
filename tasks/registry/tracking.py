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
import shutil
import socket
import tempfile
import time
from pathlib import Path

from tasks.artifacts import pid_alive, stable_hash
from tasks.errors import PipelineError
from tasks.registry.naming import experiment_name, parent_run_name, profile_run_name, registered_model_name

log = logging.getLogger(__name__)

CONFIG_KEY_TAG = "config_key"  # the pipeline config and model revision a parent run runs
HOST_TAG, PID_TAG = "owner_host", "owner_pid"  # the process that opened a parent run outside Airflow


# MLflow 3's UI shows an experiment of this kind as a model-training one (runs, models, registry); the
# GenAI/"Model training" mode itself is a per-browser setting that links choose with ?workflowType=.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# The runs table's Source column: what produced the run.
SOURCE_TAGS = {"mlflow.source.name": "quantization_pipeline", "mlflow.source.type": "JOB"}
NOTE_TAG = "mlflow.note.content"  # a run's description in the UI

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


def set_version_tag(client, name: str, version, key: str, value: str, attempts: int = 5) -> None:
    """Set a model version's tag. Runs that share a version (a variant two configs both hold) verify it
    concurrently; MLflow's SQL store sets a tag by select-then-insert, so the second writer of a new key
    can fail on the unique constraint: the row is then there and a retry updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_model_version_tag(name, str(version), key, value)
            return
        except MlflowException as exc:
            if "UNIQUE constraint" not in str(exc) and "IntegrityError" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def ensure_experiment(client, base_model: str, artifact_location: str | None = None, tracking_uri: str | None = None) -> str:
    """The base model's experiment, created on first use. A local artifact directory only goes with a
    local store (`tracking_uri` sqlite:/file:/path); a tracking server decides for itself."""
    if tracking_uri is not None and not tracking_uri.startswith(("sqlite:", "file:", "/")):
        artifact_location = None
    name = experiment_name(base_model)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # an experiment made by an older version
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if artifact_location and "://" not in artifact_location:
        location = Path(artifact_location).resolve().as_uri()
    elif artifact_location:
        location = artifact_location
    return client.create_experiment(name, artifact_location=location, tags={"base_model": base_model, EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


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
        run_name=parent_run_name(),
        tags={"pipeline_run": "true", "base_model": base_model, "base_revision": base_revision, **SOURCE_TAGS,
              NOTE_TAG: f"Pipeline run on {base_model} (revision {base_revision[:12]}): running.", **tags},
    )
    for key, value in sorted(params.items()):
        client.log_param(run.info.run_id, key, str(value)[:500])
    return run.info.run_id


def finish_pipeline_run(tracking_uri: str, run_id: str, artifacts_dir: str | Path | None = None, status: str = "FINISHED",
                        metrics: dict | None = None, description: str | None = None) -> None:  # fmt: skip
    client = client_for(tracking_uri)
    if description:
        client.set_tag(run_id, NOTE_TAG, description)
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
    now = int(time.time() * 1000)
    seconds = summary.get("seconds") or 0
    samples, seq_len = summary.get("samples", "?"), summary.get("seq_len", "?")
    note = (f"Layer profile of {base_model} (revision {base_revision[:12]}) on {samples} x {seq_len} tokens of calibration text: per module "
            "weight kurtosis, activation sensitivity, output error per ladder rung and the Fisher loss estimate "
            "(`scores.csv`), which every allocator of the runs that link to it (tag `profile_run_id`) reads. "
            f"Computed once in {seconds:.0f} s and reused while model and calibration stay the same.")
    run = client.create_run(exp_id, run_name=profile_run_name(base_model, samples, seq_len), start_time=now - int(1000 * seconds),
                            tags={"profile_run": "true", PROFILE_KEY_TAG: key, "base_model": base_model, "base_revision": base_revision,
                                  **SOURCE_TAGS, NOTE_TAG: note})  # fmt: skip
    from mlflow.entities import Metric, Param

    params = {k: summary[k] for k in ("samples", "seq_len", "layers", "fisher_samples", "batch_size", "normalize", "device",
                                      "rival_scores", "dkld_windows") if k in summary}
    params["rungs"] = ",".join(summary.get("rungs", []))
    metrics = {"profile_seconds": summary.get("seconds"), **{f"profile_{k}_seconds": v for k, v in summary.get("phase_seconds", {}).items()}}
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()],
                     params=[Param(k, str(v)) for k, v in params.items()])  # fmt: skip
    for name in ("scores.csv", "profiling.json"):
        client.log_artifact(run.info.run_id, str(profile_dir / name))
    client.set_terminated(run.info.run_id, "FINISHED", end_time=now)
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


# The metrics a reader compares variants by, logged again under one prefix so that they sort together in
# the UI's column chooser and compare page (the full set stays under its own names).
KEY_PREFIX = "key/"
KEY_METRICS = {"bpp": "nominal_bpp", "kld_wikitext2": "kld_wikitext2", "kld_c4": "kld_c4", "ppl_wikitext2": "ppl_wikitext2",
               "ppl_c4": "ppl_c4", "top1_wikitext2": "top1_wikitext2"}  # fmt: skip
# Rounded as the results table shows them, so the UI's columns read at a glance.
KEY_DIGITS = {"bpp": 3, "size_mib": 1, "kld_wikitext2": 4, "kld_c4": 4, "ppl_wikitext2": 2, "ppl_c4": 2, "top1_wikitext2": 3}
LOGGED_MODEL_TYPE = "quantized-llm"


def key_metrics(metrics: dict) -> dict:
    """`key/bpp`, `key/size_mib`, `key/kld_wikitext2`, ... from a variant's metrics (those it has)."""
    out = {short: metrics[name] for short, name in KEY_METRICS.items() if metrics.get(name) is not None}
    if metrics.get("saved_bytes") is not None:
        out["size_mib"] = metrics["saved_bytes"] / 2**20
    return {f"{KEY_PREFIX}{k}": round(v, KEY_DIGITS[k]) for k, v in _finite(out).items()}


def logged_model_name(variant: str) -> str:
    """A variant's name as MLflow allows a logged model's ('/', ':', '.' are not): hqq-optimal-3_25@SB30."""
    return variant.replace("/", "-").replace(".", "_").replace(":", "_")


def variant_model_id(client, run_id: str) -> str | None:
    """The logged model a variant run produced (None for the baseline, or a run from before logged models)."""
    outputs = client.get_run(run_id).outputs
    models = outputs.model_outputs if outputs else []
    return models[0].model_id if models else None


def log_variant(tracking_uri: str, parent_run_id: str, variant: dict, metrics: dict, files: dict[str, str | Path],
                build_model=None, weights_dir: str | Path | None = None, started_ms: int | None = None,
                description: str = "") -> tuple[str, bool, str | None]:  # fmt: skip
    """Create (or reuse) the child run of a variant; return (run_id, reused, logged model id).

    `variant` holds name, backend, method, budget_label, base_model, base_revision, config_hash, options.
    `files` are small artifacts (bit map and its heat map, manifests) logged at the run root, each under its
    key as file name when the key has a suffix (`bitmap.json`). `build_model(path)` writes the variant's
    MLflow model there, logged as the run's MLflow logged model (its Models column, the experiment's
    Models tab): what the registered version points to. Its files identical to those of `weights_dir` (the
    stage output) become hard links to them where both are on this filesystem (tasks/registry/dedup.py),
    and the run records the bytes it stores. `started_ms`: when the variant's work began (its quantize
    step), so the run's duration is the variant's.
    """
    client = client_for(tracking_uri)
    parent = client.get_run(parent_run_id)
    exp_id = parent.info.experiment_id
    existing = find_variant_run(client, exp_id, variant["config_hash"])
    if existing is not None:
        log.info("mlflow: variant %s already recorded in run %s", variant["config_hash"], existing.info.run_id)
        return existing.info.run_id, True, variant_model_id(client, existing.info.run_id)
    name = variant["name"]
    run = client.create_run(
        exp_id,
        run_name=name,
        start_time=started_ms,
        tags={
            "mlflow.parentRunId": parent_run_id,
            "config_hash": variant["config_hash"],
            "variant": name,
            "backend": variant["backend"],
            "method": variant["method"],
            "base_model": variant["base_model"],
            **SOURCE_TAGS,
            **({NOTE_TAG: description} if description else {}),
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
    keys = key_metrics(metrics)  # linked to the logged model where there is one (logged with it below)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in {**_finite(metrics), **({} if build_model else keys)}.items()],
        params=[Param(k, str(v)[:500]) for k, v in params.items()],
    )
    with tempfile.TemporaryDirectory(prefix="quant-files-") as tmp:
        for label, path in files.items():
            if not path:
                continue
            if not Path(path).exists():  # a step that did not fetch its inputs: say so, never log a run without them
                raise PipelineError(f"{label} file {path} is missing on this machine: cannot record variant {name}")
            if Path(label).suffix:  # logged under its label: the same file name in every run
                path = shutil.copyfile(path, Path(tmp) / label)
            client.log_artifact(run_id, str(path))
    model_id = None
    if build_model is not None:
        model_id = _log_model(client, exp_id, run_id, name, params, build_model, keys, now)
        _store_once(client, run_id, model_id, weights_dir)
    client.set_terminated(run_id, "FINISHED")
    return run_id, False, model_id


def _log_model(client, exp_id: str, run_id: str, name: str, params: dict, build_model, keys: dict, now: int) -> str:
    """The variant's MLflow model as a logged model of its run, with the run's key metrics linked to it."""
    from mlflow.entities import LoggedModelOutput, Metric

    model = client.create_logged_model(exp_id, name=logged_model_name(name), source_run_id=run_id, model_type=LOGGED_MODEL_TYPE,
                                       params={k: str(v)[:500] for k, v in params.items()}, tags={"variant": name})  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="quant-model-") as tmp:
            client.log_model_artifacts(model.model_id, str(build_model(Path(tmp) / "model")))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, 0)])
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0, model_id=model.model_id, run_id=run_id) for k, v in keys.items()])
    return model.model_id


def model_dir_of(client, model_id: str) -> str:
    """Where a logged model's files are (a local path or an object-store URI)."""
    return client.get_logged_model(model_id).artifact_location


def _store_once(client, run_id: str, model_id: str, weights_dir) -> None:
    from tasks.registry.dedup import link_duplicates, local_dir

    logged = local_dir(model_dir_of(client, model_id))
    if weights_dir is None or logged is None or not logged.is_dir():
        return  # an object store: the copies stay (docs/operations.md, Storage)
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
