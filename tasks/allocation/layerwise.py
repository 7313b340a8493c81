"""LIM and ZD allocation (Layer-Wise Quantization, docs/methods.md §5; the authors' code was never published).

Layers are ranked by importance; the least important ones move to a low rung, the rest stay at a high
rung, and all seven linears of a layer follow their layer. The paper states k as "the largest count that
fits the budget" with the average (k*b_lo + (L-k)*b_hi)/L; read literally, moving more layers down always
fits, so we take the reading that makes it a budget rule: keep as many of the most important layers
high as fit, i.e. k is the smallest number of least important layers moved to the low rung such that
the parameter-weighted average bpp <= budget.

- LIM(i) = -mean cos(h_in, h_out): higher = the layer changes its input more = more important.
- ZD(i) = fraction of the layer's weights with z-score > 1. The abstract says fewer large weights =
  more important ("fewer-large-is-important", the default); third-party code sorts the other way
  ("more-large-is-important").
"""

from __future__ import annotations

import logging

from tasks.allocation.budget import as_bpp, as_rung
from tasks.allocation.methods import takes_options
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import LADDERS, Rung, split_key

log = logging.getLogger(__name__)

ZD_DIRECTIONS = ("fewer-large-is-important", "more-large-is-important")
_EPS = 1e-12  # float slack when comparing an average bpp with the budget


def default_low(budget: float, below: Rung | None = None, ladder: str = "hqq") -> Rung:
    """The highest rung of the ladder with bpp <= budget (and cheaper than `below`, if given)."""
    rungs = LADDERS[below.ladder if below else ladder]
    fitting = [r for r in rungs if r.bpp <= budget + _EPS and (below is None or r.bpp < below.bpp)]
    if not fitting:
        raise PipelineError(f"budget {budget:g} bpp is below the cheapest rung ({rungs[0].name}={rungs[0].bpp:.4f} bpp)")
    return max(fitting, key=lambda r: r.bpp)


def default_high(low: Rung) -> Rung:
    """The next bit width at the same group size (block, for a llama.cpp type), e.g. b3g64 -> b4g64, Q3_K -> Q4_K."""
    above = [r for r in LADDERS[low.ladder] if r.group_size == low.group_size and r.bits > low.bits]
    if not above:
        raise PipelineError(f"no rung above {low.name} to keep important layers at; pass --low and --high")
    return min(above, key=lambda r: r.bits)


def default_rungs(budget: float) -> tuple[Rung, Rung]:
    low = default_low(budget)
    return low, default_high(low)


def least_important_first(importance: dict[int, float]) -> list[int]:
    """Layers by ascending importance; ties keep layer order."""
    return sorted(importance, key=lambda layer: (importance[layer], layer))


def layers_to_lower(order: list[int], layer_params: dict[int, int], low: Rung, high: Rung, budget: float) -> int:
    """Smallest k such that the first k layers of `order` at `low`, the rest at `high`, average <= budget."""
    total = sum(layer_params.values())
    bits = high.bpp * total
    for k in range(len(order) + 1):
        if bits / total <= budget + _EPS:
            return k
        if k < len(order):
            bits -= (high.bpp - low.bpp) * layer_params[order[k]]
    raise PipelineError(
        f"budget {budget:g} bpp is infeasible with low rung {low.name} ({low.bpp:.4f} bpp): every layer at the low rung is over it"
    )


def allocate_by_importance(scores: Scores, budget, importance: dict[int, float], method: str, low=None, high=None, options: dict | None = None) -> BitMap:
    bpp = as_bpp(budget)
    high = None if high is None else as_rung(high)
    low = default_low(bpp, below=high) if low is None else as_rung(low)
    high = default_high(low) if high is None else high
    if low.bpp >= high.bpp:
        raise PipelineError(f"low rung {low.name} must cost fewer bits than high rung {high.name}")
    layer_params: dict[int, int] = {}
    for key, n in scores.params.items():
        layer = split_key(key)[0]
        layer_params[layer] = layer_params.get(layer, 0) + n
    order = least_important_first(importance)
    k = layers_to_lower(order, layer_params, low, high, bpp)
    lowered = set(order[:k])
    modules = {key: low if split_key(key)[0] in lowered else high for key in scores.keys}
    log.info("%s: %d of %d layers at %s, the rest at %s", method, k, len(order), low.name, high.name)
    options = {**(options or {}), "low": low.name, "high": high.name, "k": k, "lowered_layers": sorted(lowered), "order": order}
    return BitMap(method=method, modules=modules, params=dict(scores.params), budget=bpp, options=options)


@takes_options("lim")
def allocate_lim(scores: Scores, budget, low, high) -> BitMap:
    """LIM: higher = more important."""
    scores.require(["lim"], "lim")
    return allocate_by_importance(scores, budget, scores.layer_values("lim"), "lim", low, high)


@takes_options("zd")
def allocate_zd(scores: Scores, budget, low, high, zd_direction: str) -> BitMap:
    """ZD, in the direction asked for (default as the abstract: fewer large weights = more important)."""
    if zd_direction not in ZD_DIRECTIONS:
        raise PipelineError(f"unknown zd_direction {zd_direction!r}: one of {', '.join(ZD_DIRECTIONS)}")
    scores.require(["zd"], "zd")
    zd = scores.layer_values("zd")
    sign = -1.0 if zd_direction == "fewer-large-is-important" else 1.0
    importance = {layer: sign * value for layer, value in zd.items()}
    return allocate_by_importance(scores, budget, importance, "zd", low, high, {"zd_direction": zd_direction})
