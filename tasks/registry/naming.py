"""Names and tag keys of mlflow/CONVENTIONS.md, in one place."""

from __future__ import annotations

import re

import time

CHAMPION = "champion"
# A variant run's artifacts at its root (its MLflow model is its logged model, not an artifact). Every
# variant run, the baseline's too, has EVALUATION_JSON: the UI's compare page shows the files all the
# compared runs share side by side (and fails on a run that has no file at all).
BITMAP_JSON, BITMAP_PNG, MANIFEST_JSON, EVALUATION_JSON = "bitmap.json", "bitmap.png", "manifest.json", "evaluation.json"


def parent_run_name(when: float | None = None) -> str:
    """`pipeline 2026-12-06T21:30:00Z`: a pipeline run, by its start (UTC)."""
    return "pipeline " + time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def profile_run_name(base_model: str, samples, seq_len) -> str:
    return f"profile {base_model} ({samples} x {seq_len} tokens)"


def experiment_name(base_model: str) -> str:
    return f"quant/{base_model}"


def registered_model_name(base_model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base_model) + "-quant"
