"""Uniform, SensiBoost and KurtBoost allocation (docs/methods.md §4), reproducing the authors exactly.

SensiBoost/KurtBoost (schnell18/lm-quant-toolkit with their HQQ fork, `identify_sensitive_modules` and
`_allocate_boost_decline_configs`): for each module type, look at its score over the layers, find the
layers where the score jumps (ratio of consecutive layers for activation sensitivity, difference for
kurtosis), keep jumps more than 3 trimmed standard deviations from the trimmed mean, and move the later
layer of each such jump `boost_stop` rungs up the ladder. Every other module gets the base rung, which is
the budget; the boost is extra memory, reported as the bit map's extra percentage.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.stats.mstats import trimmed_mean, trimmed_std

from tasks.allocation.budget import as_rung
from tasks.allocation.methods import takes_options
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap, uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import Rung, boost, fused_groups, split_key

log = logging.getLogger(__name__)

TRIM = (0.05, 0.05)  # 5% of each tail, as the authors
Z_THRESHOLD = 3.0


def layer_jumps(values: np.ndarray, diff: str) -> np.ndarray:
    """D[i] = S[i+1] / S[i] ('ratio', SensiBoost) or S[i+1] - S[i] ('difference', KurtBoost)."""
    values = np.asarray(values, dtype=float)
    if diff == "ratio":
        if (values <= 0).any():
            raise PipelineError("sensitivity ratios need positive scores; the table has a score <= 0")
        return values[1:] / values[:-1]
    if diff == "difference":
        return np.diff(values)
    raise PipelineError(f"unknown jump measure {diff!r}: 'ratio' or 'difference'")


def find_outliers(values: np.ndarray, diff: str, top_m: int = 0) -> list[int]:
    """Outlier layers of one module type, most extreme first (docs/methods.md §4).

    values: the score per layer, layer 0 first. z = |D - trimmed mean| / trimmed std (ddof 1); jumps
    with z > 3, sorted by z descending (ties keep layer order), the first `top_m` (0 = all); the outlier
    is the later layer of the jump, i + 1.
    """
    jumps = layer_jumps(values, diff)
    if jumps.size < 2:
        return []
    mu = float(np.ma.filled(trimmed_mean(jumps, limits=TRIM), np.nan))
    sd = float(np.ma.filled(trimmed_std(jumps, limits=TRIM, ddof=1), np.nan))
    with np.errstate(divide="ignore", invalid="ignore"):  # sd == 0: any deviation is infinitely far
        z = np.abs(jumps - mu) / sd
    hits = np.flatnonzero(z > Z_THRESHOLD)
    hits = hits[np.argsort(-z[hits], kind="stable")]
    if top_m:
        hits = hits[:top_m]
    return [int(i) + 1 for i in hits]


def module_outliers(scores: Scores, column: str, diff: str, top_m: int) -> dict[str, list[int]]:
    """find_outliers for each module type; returns module -> outlier layers."""
    values = scores.module_values(column)
    by_module: dict[str, list[tuple[int, float]]] = {}
    for key, value in zip(scores.keys, values):
        layer, module = split_key(key)
        by_module.setdefault(module, []).append((layer, value))
    found = {}
    for module, series in by_module.items():
        series.sort()
        layers = [layer for layer, _ in series]
        if layers != list(range(len(layers))):
            raise PipelineError(f"module {module} of {scores.source} does not cover layers 0..{len(layers) - 1}")
        found[module] = find_outliers(np.array([v for _, v in series]), diff, top_m)
    return found


def random_control(scores: Scores, outliers: dict[str, list[int]], exclude: dict[str, list[int]], seed: int) -> dict[str, list[int]]:
    """The authors' ablation: as many layers per module type as outliers found, drawn at random among
    the layers that are outliers of neither score."""
    rng = np.random.default_rng(seed)
    layers = scores.layers
    picked = {}
    for module, found in outliers.items():
        pool = [layer for layer in layers if layer not in set(found) | set(exclude.get(module, []))]
        picked[module] = sorted(int(x) for x in rng.choice(pool, size=min(len(found), len(pool)), replace=False))
    return picked


def boosted_bitmap(scores: Scores, method: str, base: Rung, outliers: dict[str, list[int]], boost_stop: int, options: dict) -> BitMap:
    high = boost(base, boost_stop)
    modules = {}
    for key in scores.keys:
        layer, module = split_key(key)
        modules[key] = high if layer in outliers.get(module, ()) else base
    n_boosted = sum(1 for r in modules.values() if r != base)
    options = {**options, "base": base.name, "boosted": high.name, "n_boosted": n_boosted, "outliers": outliers}
    return BitMap(method=method, modules=modules, params=dict(scores.params), budget=base.bpp, options=options)


def _boost(scores: Scores, budget, method: str, column: str, diff: str, boost_stop: int, top_m: int, ablation: bool, seed: int,
           tie_fused: bool = False, tie_experts: bool = False) -> BitMap:  # fmt: skip
    base = as_rung(budget)
    if int(boost_stop) < 1:
        raise PipelineError(f"boost_stop must be at least 1 (got {boost_stop})")
    if int(top_m) < 0:
        raise PipelineError(f"top_m must be 0 (all) or more (got {top_m})")
    scores.require([column], method)
    outliers = module_outliers(scores, column, diff, int(top_m))
    options = {"boost_stop": int(boost_stop), "top_m": int(top_m), "score": column}
    if ablation:
        exclude = {m: list(v) for m, v in outliers.items()}
        for other, other_diff in (("sensitivity", "ratio"), ("kurtosis", "difference")):
            if other != column and scores.has(other):
                for m, v in module_outliers(scores, other, other_diff, int(top_m)).items():
                    exclude.setdefault(m, []).extend(v)
        outliers = random_control(scores, outliers, exclude, int(seed))
        options.update(ablation=True, seed=int(seed))
    log.info("%s: %d outlier module(s) boosted %s -> %s", method, sum(map(len, outliers.values())), base.name, boost(base, int(boost_stop)).name)
    bitmap = boosted_bitmap(scores, method, base, outliers, int(boost_stop), options)
    return tie_boosts(bitmap, tie_fused, tie_experts) if tie_fused or tie_experts else bitmap


def tie_boosts(bitmap: BitMap, fused: bool = True, experts: bool = False) -> BitMap:
    """A boost spreads to the modules fused with a boosted one (q/k/v, gate/up of a layer): each fused
    group takes its highest rung, so a serving engine can run it as one kernel. It costs memory above
    the plain boost's, reported like the boost's own (extra_pct)."""
    keys = list(bitmap.modules)
    for group in fused_groups(keys, fused, experts):
        top = max((bitmap.modules[keys[i]] for i in group), key=lambda r: r.bpp)
        for i in group:
            bitmap.modules[keys[i]] = top
    bitmap.options.update({k: True for k, on in (("tie_fused", fused), ("tie_experts", experts)) if on})
    return bitmap


@takes_options("sensiboost")
def allocate_sensiboost(scores: Scores, budget, boost_stop: int, top_m: int, ablation: bool, seed: int,
                        tie_fused: bool, tie_experts: bool) -> BitMap:  # fmt: skip
    """SensiBoost: jumps in activation sensitivity (ratio of consecutive layers). Paper: SB30.

    ablation=True is the authors' random control (as many random non-outlier layers per module type).
    tie_fused=True boosts the whole fused group of a boosted module (`tie_boosts`); tie_experts=True every
    expert linear of a mixture-of-experts layer with a boosted one.
    """
    return _boost(scores, budget, "sensiboost", "sensitivity", "ratio", boost_stop, top_m, ablation, seed, tie_fused, tie_experts)


@takes_options("kurtboost")
def allocate_kurtboost(scores: Scores, budget, boost_stop: int, top_m: int, ablation: bool, seed: int,
                       tie_fused: bool, tie_experts: bool) -> BitMap:  # fmt: skip
    """KurtBoost: jumps in weight kurtosis (difference of consecutive layers). Paper: KB21."""
    return _boost(scores, budget, "kurtboost", "kurtosis", "difference", boost_stop, top_m, ablation, seed, tie_fused, tie_experts)


@takes_options("uniform")
def allocate_uniform(scores: Scores, budget) -> BitMap:
    """Every module at the budget's rung (the HQQ baseline)."""
    return uniform_bitmap(scores.params, as_rung(budget))

