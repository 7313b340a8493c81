"""Completion markers: a finished pipeline run marks its configuration done for its checkpoint, however
it was started, so the zoo (tasks/orchestration/zoo.py) quantizes only what is new. A marker is the
artifact `StageOutput(root, "zoo-runs", {"config": ..., "revision": ...})` whose manifest records the
model, the MLflow parent run id and the reports directory, beside the run's results."""

from __future__ import annotations

import logging
from pathlib import Path

from tasks.artifacts import StageOutput, write_json_atomic
from tasks.settings import Settings

log = logging.getLogger(__name__)

MARKER_STAGE = "zoo-runs"


def marker_inputs(config: dict, revision: str) -> dict:
    """What makes an entry's run distinct: its normalized config (without the requested revision,
    which only selects) and the resolved checkpoint revision. The entry's name is not part of it."""
    return {"config": {k: v for k, v in sorted(config.items()) if k != "revision"}, "revision": revision}


def marker(config: dict, revision: str, artifact_root: str | Path | None = None) -> StageOutput:
    root = artifact_root or Settings.from_env().artifact_root
    return StageOutput(root, MARKER_STAGE, marker_inputs(config, revision))


def record_completion(artifact_root: str | Path, config: dict, model: dict, parent_run_id: str, reports: Path, rows: list) -> str:
    """Mark `config` done for the checkpoint `model` (a finished pipeline run's last act); returns the
    marker's URI. Idempotent: a marker already there (a rerun, a concurrent run) is kept."""
    out = marker(config, model["revision"], artifact_root)
    if out.is_complete():
        return out.uri
    with out.build() as tmp:
        write_json_atomic(tmp / "results.json", rows)
        write_json_atomic(
            tmp / "manifest.json",
            {"model": model.get("source"), "revision": model["revision"], "parent_run_id": parent_run_id, "reports": str(reports)},
        )
    log.info("zoo: marked %s at %s done (parent run %s): %s", model.get("source"), model["revision"], parent_run_id, out.uri)
    return out.uri
