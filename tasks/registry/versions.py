"""Registered model versions: one registered model per base model, one version per variant.

Registration is idempotent: a version whose `config_hash` tag matches is returned, never duplicated.
"""

from __future__ import annotations

import logging

from tasks.registry.naming import registered_model_name
from tasks.registry.tracking import client_for

log = logging.getLogger(__name__)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def register_version(tracking_uri: str, base_model: str, run_id: str, tags: dict) -> tuple[str, bool]:
    """Return (version number, created). `tags` must include model_hash: the identity of the quantized
    weights, so re-evaluating the same model (other eval settings) adds runs but never a version."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    name = registered_model_name(base_model)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name,
            tags={"base_model": base_model},
            description=f"Quantized variants of {base_model}; the `champion` alias marks the promoted one.",
        )
    model_hash = tags["model_hash"]
    for mv in client.search_model_versions(f"name = '{name}' and tag.model_hash = '{model_hash}'"):
        log.info("registry: %s version %s already holds %s", name, mv.version, model_hash)
        return mv.version, False
    run = client.get_run(run_id)
    source = f"{run.info.artifact_uri}/model"
    mv = client.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={k: _fmt(v) for k, v in {**tags, "run_id": run_id}.items()},
        description=f"{tags.get('variant', '')}: {tags.get('nominal_bpp', '')} bpp",
    )
    log.info("registry: registered %s version %s (%s)", name, mv.version, tags.get("variant"))
    return mv.version, True
