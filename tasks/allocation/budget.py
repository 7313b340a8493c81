"""Reading budgets and rung lists the same way for every method (CLI strings, DAG params, floats)."""

from __future__ import annotations

import math

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
