"""The model zoo: a YAML list of pipeline configurations, each run once per checkpoint revision.

The `model_zoo` DAG (dags/model_zoo.py) runs daily: it plans (resolves every entry's checkpoint
revision and computes key = hash(entry config + revision)), skips the entries whose key already has a
completion marker, and triggers one `quantization_pipeline` DAG run per remaining entry, with the
entry's config as the run's conf. Every pipeline run writes the marker of its config and checkpoint
when it finishes (`record_completion`), however it was started, so a zoo run quantizes only what is
new: a new entry, a changed entry, or a new checkpoint revision. Planning needs no torch: it runs in
the Airflow image.
The key covers the entry's full normalized config (PipelineConfig defaults filled in): a new default
in PipelineConfig reruns every entry once, which is what changed results call for.

Zoo file (dags/zoo.yaml, or the file named by $QUANT_ZOO_FILE):

    defaults:            # optional: PipelineConfig fields shared by every entry
      eval_tokens: 2048
    entries:
      - name: smollm2-135m      # unique; names the entry in logs and errors
        model: embedded         # 'embedded', a local checkpoint directory or a hub id
        revision: null          # hub branch, tag or commit (null: the default branch)
        watch: true             # checkpoint_watch announces new revisions of this model
        uniform_budgets: [b4g64]
        ...                     # any other PipelineConfig field (tasks/orchestration/config.py)

Completion markers are artifacts `StageOutput(root, "zoo-runs", {"config": ..., "revision": ...})`
whose manifest records the model, the MLflow parent run id, the reports directory and the results.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tasks.model_revisions import is_hub_id, lookup_revision
from tasks.registry.completion import marker
from tasks.errors import PipelineError
from tasks.settings import REPO_ROOT, Settings

log = logging.getLogger(__name__)

ZOO_ENV = "QUANT_ZOO_FILE"
DEFAULT_ZOO = REPO_ROOT / "dags" / "zoo.yaml"
ENTRY_ONLY = ("name", "watch")  # entry fields that are not PipelineConfig fields


@dataclass(frozen=True)
class ZooEntry:
    name: str
    config: dict = field(default_factory=dict)  # PipelineConfig fields, defaults merged in
    watch: bool = False

    @property
    def model(self) -> str:
        return str(self.config.get("model", "embedded"))

    @property
    def revision(self) -> str | None:
        return self.config.get("revision")


def zoo_path(path: str | Path | None = None) -> Path:
    return Path(path or os.environ.get(ZOO_ENV) or DEFAULT_ZOO)


def load_zoo(path: str | Path | None = None, *, validate: bool = True) -> list[ZooEntry]:
    """The zoo's entries; with `validate`, each checked by PipelineConfig.from_dict (imports torch).

    Any problem is one PipelineError line naming the file and the entry.
    """
    import yaml

    path = zoo_path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PipelineError(f"cannot read the zoo file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        first = str(exc).strip().splitlines()[0]
        raise PipelineError(f"zoo file {path} is not valid YAML: {first}") from None
    data = data or {}
    if not isinstance(data, dict) or not isinstance(data.get("entries", []), list):
        raise PipelineError(f"zoo file {path}: expected a mapping with an 'entries' list")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise PipelineError(f"zoo file {path}: 'defaults' must be a mapping")
    unknown = sorted(set(data) - {"defaults", "entries"})
    if unknown:
        raise PipelineError(f"zoo file {path}: unknown top-level key(s) {', '.join(unknown)}")
    entries: list[ZooEntry] = []
    for i, raw in enumerate(data.get("entries") or []):
        entries.append(_entry(raw, defaults, i, path, validate))
    names = [e.name for e in entries]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise PipelineError(f"zoo file {path}: duplicate entry name(s) {', '.join(dupes)}")
    return entries


def _entry(raw, defaults: dict, index: int, path: Path, validate: bool) -> ZooEntry:
    if not isinstance(raw, dict):
        raise PipelineError(f"zoo file {path}: entry #{index + 1} is not a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise PipelineError(f"zoo file {path}: entry #{index + 1} has no name")
    watch = raw.get("watch", False)
    if not isinstance(watch, bool):
        raise PipelineError(f"zoo entry {name!r}: watch must be true or false, got {watch!r}")
    config = {**defaults, **{k: v for k, v in raw.items() if k not in ENTRY_ONLY}}
    if not config.get("model"):
        raise PipelineError(f"zoo entry {name!r}: no model given")
    if validate:
        from tasks.orchestration.config import PipelineConfig

        try:
            config = asdict(PipelineConfig.from_dict(config))
        except PipelineError as exc:
            raise PipelineError(f"zoo entry {name!r}: {exc}") from None
        except TypeError as exc:  # a field of the wrong type, e.g. budgets: 4.25 instead of a list
            raise PipelineError(f"zoo entry {name!r}: {exc}") from None
    return ZooEntry(name=name.strip(), config=config, watch=watch)


def find_entry(entries: list[ZooEntry], model: str, name: str | None = None) -> ZooEntry | None:
    """The entry called `name`, else the first whose model is `model` (paths compared resolved)."""
    if name:
        for entry in entries:
            if entry.name == name:
                return entry
    for entry in entries:
        if _same_model(entry.model, model):
            return entry
    return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    if is_hub_id(a) or is_hub_id(b):
        return False
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


# ---- planning ------------------------------------------------------------------------------------


def plan_zoo(
    entries: list[ZooEntry],
    artifact_root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    lookup=lookup_revision,
) -> list[dict]:
    """One item per entry, with a status: "pending" (to run), "done" (its marker exists), "duplicate"
    (same work as an earlier entry) or "error" (revision lookup failed: the entry's run fails, the
    others go on, and the next run tries again).

    Items are JSON-able: name, model, status, and for resolved entries revision, key and config (hub
    ids pinned to the resolved commit, so the run quantizes exactly the checkpoint that was keyed).
    """
    settings = Settings.from_env()
    root = artifact_root or settings.artifact_root
    cache = cache_dir or settings.cache_dir
    items: list[dict] = []
    seen: dict[str, str] = {}
    for entry in entries:
        try:
            revision = lookup(entry.model, entry.revision, cache)
        except PipelineError as exc:
            log.error("zoo: %s: %s", entry.name, exc)
            items.append({"name": entry.name, "model": entry.model, "status": "error", "reason": str(exc)})
            continue
        config = dict(entry.config)
        if is_hub_id(entry.model):
            config["revision"] = revision
        out = marker(entry.config, revision, root)
        item = {"name": entry.name, "model": entry.model, "revision": revision, "key": out.key, "config": config}
        if out.key in seen:
            item.update(status="duplicate", reason=f"same configuration and checkpoint as {seen[out.key]}")
        elif out.is_complete():
            parent = out.manifest().get("parent_run_id")
            item.update(status="done", reason=f"done for revision {revision} (parent run {parent})", parent_run_id=parent)
        else:
            item.update(status="pending", reason=f"new: revision {revision}")
        log.info("zoo: %s %s: %s (key %s)", "run" if item["status"] == "pending" else "skip", entry.name, item["reason"], out.key)
        seen.setdefault(out.key, entry.name)
        items.append(item)
    counts = {s: sum(i["status"] == s for i in items) for s in ("pending", "done", "duplicate", "error")}
    log.info("zoo: %d to run, %d done, %d duplicate, %d failed lookups", *counts.values())
    return items


def trigger_requests(items: list[dict], zoo_run_id: str) -> list[dict]:
    """TriggerDagRunOperator arguments, one per pending entry: the entry's config as conf, and a run id
    of the entry, its key and this zoo run (a retry of the trigger finds its own run, not a new one)."""
    from tasks.artifacts import stable_hash

    suffix = stable_hash(zoo_run_id, 8)
    return [
        {"trigger_run_id": f"zoo__{item['name']}__{item['key']}__{suffix}", "conf": item["config"]}
        for item in items
        if item["status"] == "pending"
    ]


def failed_lookups(items: list[dict]) -> list[str]:
    return [f"{i['name']}: {i['reason']}" for i in items if i["status"] == "error"]


def run_pending(items: list[dict], runner) -> list[dict]:
    """The pending entries' pipelines, one after the other, each by `runner(config)` (`python -m tasks zoo
    run` passes the in-process runner, tasks/orchestration/cli.py)."""
    results = []
    for item in items:
        if item["status"] != "pending":
            continue
        log.info("zoo: %s: running the pipeline for %s at %s", item["name"], item["model"], item["revision"])
        result = runner(item["config"])
        results.append({"name": item["name"], "parent_run_id": result.get("parent_run_id"), "reports": result.get("reports")})
    return results
