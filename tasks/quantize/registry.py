"""Backends by name: the one table a backend is added to. Imported lazily: each backend's library lives
in its own container family, and this module stays light (no torch) for the configuration's names."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from tasks.errors import PipelineError

if TYPE_CHECKING:  # the names stay importable without torch (planning runs in the Airflow image)
    from tasks.quantize.base import Backend, Capabilities

# name -> "module:class" of its Backend subclass (or the class itself), whose `capabilities` say what it needs
BACKENDS: dict[str, str | type] = {
    "hqq": "tasks.quantize.hqq:HQQBackend",
    "gptq": "tasks.quantize.gptq:GPTQBackend",
    "awq": "tasks.quantize.awq:AWQBackend",
    "bnb": "tasks.quantize.bnb:BnBBackend",
}


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise PipelineError(f"unknown backend {name!r}: one of {', '.join(BACKENDS)}")
    entry = BACKENDS[name]
    if isinstance(entry, type):
        return entry
    module, _, cls = entry.partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise PipelineError(f"backend {name!r} is not installed in this environment ({exc.name or exc}); use its container") from None


def get_backend(name: str) -> Backend:
    return backend_class(name)()


def capabilities(name: str) -> Capabilities:
    return backend_class(name).capabilities


def own_error_names() -> tuple[str, ...]:
    """The backends' own rung errors that the profile can measure (Capabilities.own_errors), in table order."""
    return tuple(dict.fromkeys(c.own_errors.name for c in map(capabilities, BACKENDS) if c.own_errors))
