"""Allocation methods by name, and the stage function: scores table + method + budget -> bit-map JSON."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Callable

from tasks.allocation.boost import allocate_kurtboost, allocate_sensiboost, allocate_uniform
from tasks.allocation.layerwise import allocate_lim, allocate_zd
from tasks.allocation.methods import check_options, method_spec
from tasks.allocation.mxq import allocate_mxq
from tasks.allocation.optimal import allocate_optimal
from tasks.allocation.rivals import allocate_delta_loss, allocate_dkld_greedy, allocate_taylor
from tasks.allocation.scores import Scores, read_scores


def allocate_preset(scores: Scores, budget) -> BitMap:
    """A preset's mix is llama.cpp's, not a function of the scores (tasks.allocation.presets)."""
    raise PipelineError("a llama.cpp preset's bit map comes from llama-quantize on the model (the pipeline's allocate step: "
                        "uniform_budgets such as Q4_K_M with the gguf backend)")
from tasks.bitmap import BitMap
from tasks.errors import PipelineError

log = logging.getLogger(__name__)

# name -> allocator(scores, budget, **options) -> BitMap
ALLOCATORS: dict[str, Callable[..., BitMap]] = {
    "uniform": allocate_uniform,
    "preset": allocate_preset,
    "sensiboost": allocate_sensiboost,
    "kurtboost": allocate_kurtboost,
    "lim": allocate_lim,
    "zd": allocate_zd,
    "mxq": allocate_mxq,
    "optimal": allocate_optimal,
    "taylor": allocate_taylor,
    "delta_loss": allocate_delta_loss,
    "dkld_greedy": allocate_dkld_greedy,
}


def method_name(method: str) -> str:
    """Canonical name; the authors' spellings ('sensi-boost', 'kurt_boost') are accepted too."""
    name = str(method).strip().lower()
    if name not in ALLOCATORS:
        name = name.replace("-", "").replace("_", "")
    if name not in ALLOCATORS:
        raise PipelineError(f"unknown allocation method {method!r}: one of {', '.join(ALLOCATORS)}")
    return name


def method_options(method: str) -> tuple[str, ...]:
    """The allocator's keyword arguments (tasks.allocation.methods.takes_options keeps them the method's options)."""
    params = list(inspect.signature(ALLOCATORS[method_name(method)]).parameters)
    return tuple(params[2:])  # after (scores, budget)


def allocate(scores: Scores, method: str, budget, options: dict | None = None, ladder: str = "hqq") -> BitMap:
    """Run one allocator, its options checked by the method table (one-line errors), on the rungs of
    `ladder` ("hqq", or "gguf": llama.cpp's types); the bit map holds the rungs actually written (a gguf
    type's fallback where a module's rows do not take it)."""
    name = method_name(method)
    options = {k: v for k, v in (options or {}).items() if v is not None}
    check_options(name, options)
    measured = [k for k in method_spec(name).measured if options.pop(k, None)]
    if measured:
        raise PipelineError(f"{name} option {measured[0]} measures the model: the pipeline's allocation stage applies it, a scores table alone cannot")
    if ladder != "hqq":
        options = ladder_options(name, scores, budget, options, ladder)
    bitmap = scores.realize(ALLOCATORS[name](scores, budget, **options))
    if scores.model:
        bitmap.options.setdefault("model", scores.model)
    return bitmap


def ladder_options(method: str, scores: Scores, budget, options: dict, ladder: str) -> dict:
    """A method's options on another ladder than HQQ's: its candidates (MILP methods) or its low rung
    (layerwise ones) from that ladder; a rung budget (uniform, boost) carries its ladder itself."""
    from tasks.allocation.budget import as_bpp
    from tasks.allocation.layerwise import default_low
    from tasks.allocation.methods import method_spec

    spec = method_spec(method)
    if spec.dkld:
        raise PipelineError(f"{method} measures HQQ rungs only (ExLlamaV3's dKLD); it has no {ladder} allocation")
    if "rungs" in spec.options and not options.get("rungs"):
        return {**options, "rungs": ladder}
    if spec.layerwise and not options.get("low"):
        return {**options, "low": default_low(as_bpp(budget), ladder=ladder).name}
    return options


def run_allocation(scores_path: str | Path, method: str, budget, options: dict | None = None, out_path: str | Path | None = None) -> BitMap:
    """The allocation stage: read the table, allocate, write the bit map atomically (if out_path)."""
    options = dict(options or {})
    model = options.pop("model", None)
    scores = read_scores(scores_path, model=model)
    bitmap = allocate(scores, method, budget, options)
    if out_path is not None:
        bitmap.save(out_path)
        log.info("bit map written to %s", out_path)
    return bitmap
