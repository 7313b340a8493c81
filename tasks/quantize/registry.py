"""Backends by name: the one table a backend is added to. Imported lazily: each backend's library lives
in its own container family, and this module stays light (no torch) for the configuration's names."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # the names stay importable without torch (planning runs in the Airflow image)
    from tasks.quantize.base import Backend, Capabilities

UNQUANTIZED = "none"  # the pseudo-backend of the unquantized base model's variant (`none/unquantized/fp32`)

# name -> "module:class" of its Backend subclass (or the class itself), whose `capabilities` say what it needs
BACKENDS: dict[str, str | type] = {
    "hqq": "tasks.quantize.hqq:HQQBackend",
    "gptq": "tasks.quantize.gptq:GPTQBackend",
    "awq": "tasks.quantize.awq:AWQBackend",
    "bnb": "tasks.quantize.bnb:BnBBackend",
    "gguf": "tasks.quantize.gguf:GGUFBackend",
}


# name -> the ladder of its rungs where it is not HQQ's (Capabilities.ladder, mirrored here for the light
# planning code: tests/test_backend_table.py checks they agree).
BACKEND_LADDERS: dict[str, str] = {"gguf": "gguf"}


def ladder_of(name: str) -> str:
    return BACKEND_LADDERS.get(name, "hqq")


_DEVICE = {"type": ["null", "string"], "default": None, "description": "where it quantizes: null = cuda:0 when torch sees a GPU, else cpu"}
# name -> its quantization options' JSON schemas, each with its default: the Param `backend_options` and
# the backend's own resolution of its options (a backend without options has no row).
BACKEND_OPTIONS: dict[str, dict[str, dict]] = {
    "gptq": {
        "sym": {"type": "boolean", "default": False, "description": "symmetric quantization"},
        "desc_act": {"type": "boolean", "default": False, "description": "GPTQ's act-order (columns by decreasing activation)"},
        "damp_percent": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.05, "description": "Hessian dampening"},
        "batch_size": {"type": "integer", "minimum": 1, "default": 1, "description": "calibration windows per forward"},
        "device": _DEVICE,
    },
    "awq": {
        "symmetric": {"type": "boolean", "default": False, "description": "symmetric quantization"},
        "duo_scaling": {"type": "boolean", "default": True, "description": "AWQ scales from activations and weights"},
        "n_grid": {"type": "integer", "minimum": 1, "default": 20, "description": "grid points of the scale search"},
        "indivisible_groups": {"type": "string", "enum": ["finer", "error"], "default": "finer",
                               "description": "a module whose row width a group size does not divide: the next finer group, or an error"},
        "device": _DEVICE,
    },
    "bnb": {
        "quant_type": {"type": "string", "enum": ["nf4", "fp4"], "default": "nf4", "description": "the 4-bit data type"},
        "double_quant": {"type": "boolean", "default": False, "description": "quantize the 4-bit scales too"},
        "int8_threshold": {"type": "number", "minimum": 0, "default": 6.0, "description": "LLM.int8's outlier threshold"},
        "device": _DEVICE,
    },
}


def option_defaults(name: str) -> dict:
    """A backend's options at their defaults ({} for a backend without options)."""
    return {k: spec["default"] for k, spec in BACKEND_OPTIONS.get(name, {}).items()}


def option_schemas() -> dict:
    """The Param `backend_options`' properties: per backend of the table, its options' schemas."""
    return {name: {"type": "object", "properties": BACKEND_OPTIONS.get(name, {}), "additionalProperties": False} for name in BACKENDS}


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


def runtimes() -> tuple[tuple[str, str], ...]:
    """The serving engines whose own runtime evaluates a backend's models (Capabilities.runtime): (metric prefix, name)."""
    return tuple(dict.fromkeys(c.runtime for c in map(capabilities, BACKENDS) if c.runtime))


def measurable_errors(names: tuple[str, ...], model_type: str) -> tuple[str, ...]:
    """Of the own rung errors `names`, those worth profiling for a `model_type` model: of a backend that
    quantizes its family (the others say why in the log)."""
    out = []
    for name in names:
        owners = [b for b in map(get_backend, BACKENDS) if b.capabilities.own_errors and b.capabilities.own_errors.name == name]
        refusals = [r for r in (b.family_refusal(model_type) for b in owners) if r]
        if len(refusals) == len(owners):
            log.info("profiling: no %s rung errors: %s", name, "; ".join(refusals))
        else:
            out.append(name)
    return tuple(out)
