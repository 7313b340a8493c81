"""Names and tag keys of mlflow/CONVENTIONS.md, in one place."""

from __future__ import annotations

import re

CHAMPION = "champion"
VERSION_TAGS = (
    "method", "backend", "budget", "nominal_bpp", "extra_pct", "ppl_wikitext2", "ppl_c4",
    "saved_bytes", "run_id", "variant", "config_hash", "model_hash", "base_revision",
)


def experiment_name(base_model: str) -> str:
    return f"quant/{base_model}"


def registered_model_name(base_model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base_model) + "-quant"
