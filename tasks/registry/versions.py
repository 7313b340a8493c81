"""Registered model versions: one registered model per base model, one version per variant.

Registration is idempotent: a version whose `model_hash` tag matches is returned, never duplicated, also
when concurrent runs register the same quantized model at once (see `register_version`).
"""

from __future__ import annotations

import logging
import time

from tasks.registry.naming import registered_model_name
from tasks.registry.tracking import KEY_DIGITS, KEY_PREFIX, client_for, key_metrics, set_version_tag

log = logging.getLogger(__name__)


# A version's tags: a short fixed set a reader scans in the registry's list (the rest is in its description
# and its run). model_hash is the identity registration deduplicates by.
VERSION_TAGS = ("variant", "method", "backend", "bpp", "size_mib", "kld_wikitext2", "ppl_wikitext2", "serving", "model_hash")
NOTE_END = "\n\n---\n\n"  # ends the note (champion, demotion) that heads a version's description


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def version_tags(variant: str, method: str, backend: str, metrics: dict, model_hash: str, serving: str) -> dict:
    """The fixed tag set, its numbers the run's key metrics as the UI's columns show them (the run holds the
    exact values)."""
    keys = key_metrics(metrics)
    numbers = {k: f"{keys[KEY_PREFIX + k]:.{KEY_DIGITS[k]}f}" for k in ("bpp", "size_mib", "kld_wikitext2", "ppl_wikitext2")
               if KEY_PREFIX + k in keys}  # fmt: skip
    values = {"variant": variant, "method": method, "backend": backend, **numbers, "serving": serving, "model_hash": model_hash}
    return {k: values[k] for k in VERSION_TAGS if values.get(k) not in (None, "")}


def _pm(m: dict, key: str, digits: int) -> str:
    if m.get(key) is None:
        return "-"
    se = m.get(f"{key}_se")
    return f"{m[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def version_description(info: dict, metrics: dict, serving: str) -> str:
    """What a version is, in numbers a reader compares (rounded), then where it comes from."""
    m = metrics
    size = f"{m['saved_bytes'] / 2**20:.1f} MiB" if m.get("saved_bytes") else "? MiB"
    bpp = f"{m['nominal_bpp']:.3f} bpp" if m.get("nominal_bpp") is not None else "? bpp"
    rows = [
        ("WikiText-2 KLD / perplexity", f"{_pm(m, 'kld_wikitext2', 4)} / {_pm(m, 'ppl_wikitext2', 2)}"),
        ("C4 KLD / perplexity", f"{_pm(m, 'kld_c4', 4)} / {_pm(m, 'ppl_c4', 2)}"),
        ("top-1 agreement with the base model (WikiText-2)", f"{m['top1_wikitext2']:.3f}" if m.get("top1_wikitext2") is not None else "-"),
        ("method / backend / budget", f"{info['method']} / {info['backend']} / {info['budget_label']}"),
        ("extra memory over the budget's rung", f"{m['extra_pct']:+.2f}%" if m.get("extra_pct") is not None else "-"),
        ("served by", serving),
        ("base model, revision", f"{info['base_model']}, {info['base_revision'][:12]}"),
        ("config hash (run) / model hash (version)", f"{info['config_hash']} / {info['model_hash']}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"**{info['name']}**: {bpp}, {size}.\n\n| | |\n|---|---|\n{table}\n"


def set_note(client, name: str, version: str, note: str | None) -> None:
    """Put `note` (the champion's reason, a demotion) at the head of a version's description, replacing
    the note it had; the description's body stays."""
    current = client.get_model_version(name, version).description or ""
    body = current.split(NOTE_END, 1)[1] if NOTE_END in current else current
    client.update_model_version(name, version, description=f"{note}{NOTE_END}{body}" if note else body)


def register_version(tracking_uri: str, base_model: str, run_id: str, tags: dict, claims_root: str | None = None,
                     wait_s: float = 600.0, description: str = "", model_id: str | None = None) -> tuple[str, bool]:  # fmt: skip
    """Return (version number, created). `tags` must include model_hash: the identity of the quantized
    weights, so re-evaluating the same model (other eval settings) adds runs but never a version.

    With `claims_root` (the artifact store all runs share) registration is safe under races: a
    create-once claim per model_hash decides which run creates the version, the others wait for it
    (tasks/registry/claims.py); nothing is deleted."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    name = registered_model_name(base_model)
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(
                name,
                tags={"base_model": base_model},
                description=f"Quantized variants of {base_model}; the `champion` alias marks the promoted one.",
            )
        except MlflowException:  # another run created it a moment ago
            client.get_registered_model(name)
    model_hash = tags["model_hash"]
    found = _existing(client, name, model_hash)
    if found is not None:
        log.info("registry: %s version %s already holds %s", name, found, model_hash)
        return found, False
    if claims_root is not None:
        from tasks.registry import claims

        key = f"{name}--{model_hash}"
        if not claims.try_claim(claims_root, key):
            deadline = time.monotonic() + wait_s
            while True:  # another run registers it: wait for its version, or take over a dead claim
                found = _existing(client, name, model_hash)
                if found is not None:
                    log.info("registry: %s version %s was registered by a concurrent run", name, found)
                    return found, False
                if claims.claim_dead(claims.read_claim(claims_root, key)) or time.monotonic() > deadline:
                    claims.take_over(claims_root, key)
                    break
                time.sleep(1.0)
    # The version is made from the run's logged model (MLflow 3); a run from before logged models has its
    # MLflow model under its own artifacts.
    source = f"models:/{model_id}" if model_id else f"{client.get_run(run_id).info.artifact_uri}/model"
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: _fmt(v) for k, v in tags.items()},
        description=description,
        model_id=model_id,
    )
    if model_id:
        _link_logged_model(client, model_id, name, mv.version)
    first = _existing(client, name, model_hash)
    if first is not None and int(first) < int(mv.version):  # two takeovers raced: keep both, say which counts
        set_version_tag(client, name, mv.version, "duplicate_of", first)
        log.warning("registry: %s version %s duplicates version %s (model_hash %s)", name, mv.version, first, model_hash)
        return first, False
    log.info("registry: registered %s version %s (%s)", name, mv.version, tags.get("variant"))
    return str(mv.version), True


def version_model_id(version) -> str | None:
    """The logged model a version was made from (the SQL registry keeps it only in the source URI)."""
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    return source[len("models:/") :] if source.startswith("models:/m-") else None


def _link_logged_model(client, model_id: str, name: str, version) -> None:
    """The logged model lists its registered versions (tag `mlflow.modelVersions`), as
    `mlflow.register_model` writes it: the experiment's Models tab shows them."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    known = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    entry = {"name": name, "version": version}
    if entry not in known:
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*known, entry])})


def _existing(client, name: str, model_hash: str) -> str | None:
    """The first version holding `model_hash` (not one marked as a duplicate)."""
    versions = [mv for mv in client.search_model_versions(f"name = '{name}' and tag.model_hash = '{model_hash}'")
                if "duplicate_of" not in (mv.tags or {})]  # fmt: skip
    return str(min((mv.version for mv in versions), key=int)) if versions else None
