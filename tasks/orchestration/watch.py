"""New-checkpoint detection for the zoo's `watch: true` entries, and the pipeline config an announced
checkpoint starts.

The `checkpoint_watch` DAG (dags/checkpoint_watch.py) calls `detect` hourly; every change becomes one
Airflow asset event on CHECKPOINTS_URI with extra {"model", "revision", "previous", "entry"}, and
`apply` then records the revisions as seen. The `quantization_pipeline` DAG is scheduled on that asset
and turns the events into its run config with `event_config`.

The last seen revision of every watched checkpoint lives in a small JSON state file,
$QUANT_WATCH_STATE or $QUANT_HOME/watch/checkpoints.json:

    {"checkpoints": {"<model>@<requested revision>": {"model", "revision", "entry", "seen"}}}

First sight of a checkpoint records it without an event: the zoo's own daily run quantizes new entries,
so deploying the watcher does not start a pipeline run per entry at once.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from tasks.artifacts import write_json_atomic
from tasks.errors import PipelineError
from tasks.settings import Settings
from tasks.model_revisions import is_hub_id, lookup_revision
from tasks.orchestration.zoo import ZooEntry, find_entry

log = logging.getLogger(__name__)

CHECKPOINTS_URI = "quantpipe://checkpoints"  # the asset that announces new checkpoint revisions
STATE_ENV = "QUANT_WATCH_STATE"


def state_path(path: str | Path | None = None) -> Path:
    if path:
        return Path(path)
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    return Settings.from_env().home / "watch" / "checkpoints.json"


def load_state(path: str | Path | None = None) -> dict:
    path = state_path(path)
    if not path.exists():
        return {"checkpoints": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(f"watch state {path} is unreadable ({exc}); delete it to start over") from None
    if not isinstance(state, dict) or not isinstance(state.get("checkpoints"), dict):
        raise PipelineError(f"watch state {path} has no 'checkpoints' mapping; delete it to start over")
    return state


def save_state(state: dict, path: str | Path | None = None) -> Path:
    return write_json_atomic(state_path(path), state)


def checkpoint_key(model: str, revision: str | None) -> str:
    """One watched checkpoint: the model and the branch/tag asked for (None: the default branch)."""
    return f"{model}@{revision or 'default'}"


def detect(
    entries: Iterable[ZooEntry],
    state: dict,
    lookup: Callable[..., str] = lookup_revision,
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """One observation per watched checkpoint, compared with the state (which is not modified):

        {"key", "entry", "model", "revision", "previous", "status"}   status: changed | first | unchanged
        {"key", "entry", "model", "status": "error", "error"}         the lookup failed

    Only "changed" is announced. A checkpoint shared by several entries is looked up once, for the
    first entry that watches it.
    """
    cache = cache_dir or Settings.from_env().cache_dir
    seen = state.get("checkpoints", {})
    observations, done = [], set()
    for entry in entries:
        key = checkpoint_key(entry.model, entry.revision)
        if not entry.watch or key in done:
            continue
        done.add(key)
        base = {"key": key, "entry": entry.name, "model": entry.model}
        try:
            revision = lookup(entry.model, entry.revision, cache)
        except PipelineError as exc:
            log.error("watch: %s: %s", entry.name, exc)
            observations.append({**base, "status": "error", "error": str(exc)})
            continue
        previous = seen.get(key, {}).get("revision")
        status = "first" if previous is None else "unchanged" if previous == revision else "changed"
        log.info("watch: %s: %s %s (was %s)", entry.name, status, revision, previous)
        observations.append({**base, "revision": revision, "previous": previous, "status": status})
    return observations


def event_extra(observation: dict) -> dict:
    """The asset event's extra for a changed checkpoint."""
    return {k: observation[k] for k in ("model", "revision", "previous", "entry")}


def apply(state: dict, observations: Iterable[dict], announced: Iterable[dict] = ()) -> tuple[dict, list[str]]:
    """Record what was seen: first sights, and changes whose event went out (`announced`: the extras).

    Returns the new state (a new dict) and the problems: failed lookups and changes not announced,
    which stay unrecorded so that the next run announces them again.
    """
    sent = {(a["model"], a["revision"]) for a in announced if a}
    checkpoints = dict(state.get("checkpoints", {}))
    problems = []
    for obs in observations:
        if obs["status"] == "error":
            problems.append(f"{obs['entry']}: {obs['error']}")
        elif obs["status"] == "changed" and (obs["model"], obs["revision"]) not in sent:
            problems.append(f"{obs['entry']}: new revision {obs['revision']} was not announced")
        elif obs["status"] in ("first", "changed"):
            checkpoints[obs["key"]] = {"model": obs["model"], "revision": obs["revision"], "entry": obs["entry"], "seen": _now()}
    return {**state, "checkpoints": checkpoints}, problems


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---- asset-triggered pipeline runs ----------------------------------------------------------------


def event_extras(triggering_asset_events) -> list[dict]:
    """The extras of an Airflow run's triggering asset events (context["triggering_asset_events"], a
    mapping asset -> events), oldest first; only events that name a model."""
    if not triggering_asset_events:
        return []
    events = [e for asset in triggering_asset_events for e in triggering_asset_events[asset]]
    events.sort(key=lambda e: str(getattr(e, "timestamp", "")))
    return [dict(e.extra) for e in events if isinstance(getattr(e, "extra", None), dict) and e.extra.get("model")]


def event_config(params: dict, extras: list[dict], entries: list[ZooEntry] | None = None) -> dict:
    """The pipeline config of a run triggered by checkpoint events.

    The latest event wins (a run quantizes one model; older events of other models are logged, and the
    zoo's daily run picks them up). Its model and revision go over the zoo entry's config when the model
    is in the zoo, else over the run's params. A hub checkpoint is pinned to the announced commit; a local
    one is its directory (the event's content hash identifies what was seen, not what can be asked for).
    """
    if not extras:
        return dict(params)
    latest = extras[-1]
    ignored = sorted({e["model"] for e in extras[:-1]} - {latest["model"]})
    if ignored:
        log.warning("checkpoint events for %s are not run by this pipeline run; the zoo's next run covers them", ", ".join(ignored))
    entry = find_entry(entries or [], latest["model"], latest.get("entry"))
    base = dict(entry.config) if entry else dict(params)
    config = {**base, "model": latest["model"]}
    if is_hub_id(latest["model"]) and latest.get("revision"):
        config["revision"] = latest["revision"]
    log.info(
        "asset-triggered run: %s at %s with %s", latest["model"], latest.get("revision"), f"zoo entry {entry.name}" if entry else "the run's params"
    )
    return config
