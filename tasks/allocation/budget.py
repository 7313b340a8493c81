"""Reading budgets and rung lists the same way for every method (CLI strings, DAG params, floats)."""

from __future__ import annotations

import math

from tasks.allocation.methods import method_spec
from tasks.errors import PipelineError
from tasks.ladder import GGUF_LADDER, GGUF_PRESETS, LADDER, LADDERS, Preset, Rung, parse_preset, parse_rung


def as_rung(budget) -> Rung:
    """A budget that must be a ladder rung: 'b4g64', '4.25' or 4.25 (boost and uniform methods)."""
    return budget if isinstance(budget, Rung) else parse_rung(budget)


def as_bpp(budget) -> float:
    """A real-valued budget in bits per parameter; a rung name ('b4g64') means that rung's exact bpp."""
    if isinstance(budget, Rung):
        return budget.bpp
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = parse_rung(budget).bpp
    if not math.isfinite(value) or value <= 0:
        raise PipelineError(f"budget must be a positive number of bits per parameter (got {budget!r})")
    return value


def as_rungs(rungs) -> tuple[Rung, ...] | str | None:
    """A candidate list: None (all), a ladder's name ('hqq', 'gguf': all of its rungs the table has),
    'b3g64,b4g64', or an iterable of names/rungs; in ladder order."""
    if rungs is None or rungs == "" or rungs == "all":
        return None
    if isinstance(rungs, str) and rungs.strip().lower() in LADDERS:
        return rungs.strip().lower()
    items = rungs.split(",") if isinstance(rungs, str) else list(rungs)
    chosen = {as_rung(str(r).strip()) if not isinstance(r, Rung) else r for r in items if str(r).strip()}
    if not chosen:
        raise PipelineError("the candidate rung list is empty")
    if len({r.ladder for r in chosen}) > 1:
        raise PipelineError(f"the candidate rungs mix the HQQ and gguf ladders: {sorted(r.name for r in chosen)}")
    return tuple(r for r in LADDER + GGUF_LADDER if r in chosen)


def parse_budget(text) -> float | Rung | Preset:
    """A ladder rung ('b3g64' / '3.25' / 'Q4_K'), a llama.cpp preset ('Q4_K_M': the size its rules reach),
    or a positive real bpp ('3.4')."""
    if isinstance(text, (Rung, Preset)):
        return text
    preset = parse_preset(text)
    if preset:
        return preset
    try:
        return parse_rung(text)
    except PipelineError:
        pass
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PipelineError(f"budget {text!r} is neither a ladder rung, a llama.cpp preset ({', '.join(GGUF_PRESETS)}) nor a number") from None
    if not (LADDER[0].bpp * 0.5 < value <= LADDER[-1].bpp):
        raise PipelineError(f"budget {value} bpp is outside the ladder's range ({LADDER[0].bpp:.2f}..{LADDER[-1].bpp:.2f})")
    return value


def parse_uniform(text) -> Rung | Preset:
    """A uniform baseline: a ladder rung ('b4g64', 'Q4_0'), or a llama.cpp preset ('Q4_K_M', and Q2_K / Q6_K,
    which name a preset and a type alike: llama-quantize's mix, embeddings and output head included)."""
    return parse_preset(text) or parse_rung(text)


def budget_label(budget: float | Rung | Preset) -> str:
    return budget.label if isinstance(budget, (Rung, Preset)) else f"{budget:.2f}"


def check_budget(method: str, budget: float | Rung, raw, options: dict, ladders: tuple[str, ...] = ("hqq",)) -> None:
    """Whether `method` can meet `budget`: a budget-exact method needs at least its cheapest allocation
    (every module on its cheapest candidate rung); lim/zd also need a rung above their low rung."""
    spec = method_spec(method)
    if spec.budget == "rung" or isinstance(budget, Preset):  # a preset's size is known once llama.cpp applied its rules
        return
    bpp = budget.bpp if isinstance(budget, Rung) else float(budget)
    rungs = as_rungs(options.get("rungs"))
    if isinstance(budget, Rung):
        ladders = (budget.ladder,)  # a rung budget plans bit maps on its own ladder only
    for ladder in ([rungs] if isinstance(rungs, str) else [None] if rungs else ladders):
        _check_cheapest(method, bpp, raw, rungs if ladder is None else LADDERS[ladder])
    for ladder in ladders:
        _check_layerwise(spec, method, bpp, raw, options, LADDERS[ladder])


def _check_cheapest(method: str, bpp: float, raw, candidates) -> None:
    cheapest = min(candidates, key=lambda r: r.bpp)
    if bpp < cheapest.bpp - 1e-9:
        raise PipelineError(f"Param budgets: {method} cannot meet {raw!r} ({bpp:.4f} bpp): its cheapest allocation, every module at"
                            f" {cheapest.name}, takes {cheapest.bpp:.4f} bpp")  # fmt: skip


def _check_layerwise(spec, method: str, bpp: float, raw, options: dict, ladder: tuple[Rung, ...]) -> None:
    if spec.layerwise and not options.get("high"):
        low = parse_rung(options["low"]) if options.get("low") else max((r for r in ladder if r.bpp <= bpp + 1e-9), key=lambda r: r.bpp, default=None)
        if low is None or low not in ladder:
            return  # below the ladder (the cheapest check says so), or a low rung of another ladder
        if not any(r.group_size == low.group_size and r.bits > low.bits for r in ladder):
            raise PipelineError(f"Param budgets: {method} at {raw!r} puts layers at {low.name}, and no rung above it keeps the"
                                " important ones: give a lower budget or method_options high")  # fmt: skip
