"""Backends by name. Imported lazily: each backend's library lives in its own container family."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tasks.errors import PipelineError

if TYPE_CHECKING:  # the names stay importable without torch (planning runs in the Airflow image)
    from tasks.quantize.base import Backend

BACKENDS = {
    "hqq": "tasks.quantize.hqq:HQQBackend",
    "gptq": "tasks.quantize.gptq:GPTQBackend",
    "awq": "tasks.quantize.awq:AWQBackend",
    "bnb": "tasks.quantize.bnb:BnBBackend",
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise PipelineError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    module, _, cls = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as exc:
        raise PipelineError(f"backend {name!r} is not installed in this environment ({exc.name or exc}); use its container") from None
