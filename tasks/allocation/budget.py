"""Reading budgets and rung lists the same way for every method (CLI strings, DAG params, floats)."""

from __future__ import annotations

import math

from tasks.allocation.methods import method_spec
from tasks.errors import PipelineError
from tasks.ladder import LADDER, Rung, parse_rung


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


def as_rungs(rungs) -> tuple[Rung, ...] | None:
    """A candidate list: None (all), 'b3g64,b4g64', or an iterable of names/rungs; ladder order."""
    if rungs is None or rungs == "" or rungs == "all":
        return None
    items = rungs.split(",") if isinstance(rungs, str) else list(rungs)
    chosen = {as_rung(str(r).strip()) if not isinstance(r, Rung) else r for r in items if str(r).strip()}
    if not chosen:
        raise PipelineError("the candidate rung list is empty")
    return tuple(r for r in LADDER if r in chosen)


def parse_budget(text) -> float | Rung:
    """A ladder rung ('b3g64' / '3.25') or a positive real bpp ('3.4')."""
    try:
        return parse_rung(text)
    except PipelineError:
        pass
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise PipelineError(f"budget {text!r} is neither a ladder rung nor a number") from None
    if not (LADDER[0].bpp * 0.5 < value <= LADDER[-1].bpp):
        raise PipelineError(f"budget {value} bpp is outside the ladder's range ({LADDER[0].bpp:.2f}..{LADDER[-1].bpp:.2f})")
    return value


def budget_label(budget: float | Rung) -> str:
    return budget.label if isinstance(budget, Rung) else f"{budget:.2f}"


def check_budget(method: str, budget: float | Rung, raw, options: dict) -> None:
    """Whether `method` can meet `budget`: a budget-exact method needs at least its cheapest allocation
    (every module on its cheapest candidate rung); lim/zd also need a rung above their low rung."""
    spec = method_spec(method)
    if spec.budget == "rung":
        return
    bpp = budget.bpp if isinstance(budget, Rung) else float(budget)
    rungs = options.get("rungs") or [r.name for r in LADDER]
    candidates = [parse_rung(r.strip()) for r in (rungs.split(",") if isinstance(rungs, str) else rungs) if str(r).strip()]
    cheapest = min(candidates, key=lambda r: r.bpp)
    if bpp < cheapest.bpp - 1e-9:
        raise PipelineError(f"Param budgets: {method} cannot meet {raw!r} ({bpp:.4f} bpp): its cheapest allocation, every module at"
                            f" {cheapest.name}, takes {cheapest.bpp:.4f} bpp")  # fmt: skip
    if spec.layerwise and not options.get("high"):
        low = parse_rung(options["low"]) if options.get("low") else max((r for r in LADDER if r.bpp <= bpp + 1e-9), key=lambda r: r.bpp)
        if not any(r.group_size == low.group_size and r.bits > low.bits for r in LADDER):
            raise PipelineError(f"Param budgets: {method} at {raw!r} puts layers at {low.name}, and no rung above it keeps the"
                                " important ones: give a lower budget or method_options high")  # fmt: skip
