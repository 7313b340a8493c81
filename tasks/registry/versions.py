"""Registered model versions: one registered model per base model, one version per variant.

Registration is idempotent: a version whose `model_hash` tag matches is returned, never duplicated, also
when concurrent runs register the same quantized model at once (see `register_version`).
"""

from __future__ import annotations

import logging
import time

from tasks.registry.naming import registered_model_name
from tasks.registry.tracking import client_for

log = logging.getLogger(__name__)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def register_version(tracking_uri: str, base_model: str, run_id: str, tags: dict, claims_root: str | None = None,
                     wait_s: float = 600.0) -> tuple[str, bool]:  # fmt: skip
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
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/model"
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: _fmt(v) for k, v in {**tags, "run_id": run_id}.items()},
        description=f"{tags.get('variant', '')}: {tags.get('nominal_bpp', '')} bpp",
    )
    first = _existing(client, name, model_hash)
    if first is not None and int(first) < int(mv.version):  # two takeovers raced: keep both, say which counts
        client.set_model_version_tag(name, str(mv.version), "duplicate_of", first)
        log.warning("registry: %s version %s duplicates version %s (model_hash %s)", name, mv.version, first, model_hash)
        return first, False
    log.info("registry: registered %s version %s (%s)", name, mv.version, tags.get("variant"))
    return str(mv.version), True


def _existing(client, name: str, model_hash: str) -> str | None:
    """The first version holding `model_hash` (not one marked as a duplicate)."""
    versions = [mv for mv in client.search_model_versions(f"name = '{name}' and tag.model_hash = '{model_hash}'")
                if "duplicate_of" not in (mv.tags or {})]  # fmt: skip
    return str(min((mv.version for mv in versions), key=int)) if versions else None
