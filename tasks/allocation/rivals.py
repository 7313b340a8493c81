"""The allocators users pick today, on our rungs and our exact budget accounting (docs/methods.md §10).

Each minimizes its source's own per-module score, summed over modules, with the same exact knapsack as
`optimal` (tasks.allocation.program): only the objective differs, so an equal-memory comparison measures
the objective and nothing else. The sources' own solvers (ModelOpt's linear program, AutoRound's dynamic
program) would find the same minimum or a worse one.

- `taylor`: NVIDIA ModelOpt `auto_quantize`'s default gradient score, column `taylor_dloss`.
- `delta_loss`: Intel AutoRound `AutoScheme`'s |dL/dW * dW| score, column `delta_loss`.

Both columns come from a profile with rival_scores (tasks.profiling.rivals, which also says how `taylor`
differs from our `fisher_dloss`).
"""

from __future__ import annotations

from tasks.allocation.budget import as_bpp, as_rungs
from tasks.allocation.methods import takes_options
from tasks.allocation.program import RungProgram, candidate_rungs
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap

COLUMN = {"taylor": "taylor_dloss", "delta_loss": "delta_loss"}


def _allocate(method: str, scores: Scores, budget, rungs, time_limit: float, mip_gap: float, tie_fused: bool,
              tie_experts: bool) -> BitMap:  # fmt: skip
    scores.require((COLUMN[method],), method)
    cand = candidate_rungs(scores, as_rungs(rungs))
    program = RungProgram(scores, scores.rung_matrix(COLUMN[method], cand), cand, method, time_limit=time_limit,
                          mip_gap=float(mip_gap), tie_fused=bool(tie_fused), tie_experts=bool(tie_experts))  # fmt: skip
    return program.allocate(as_bpp(budget), options={"error": COLUMN[method]})


@takes_options("taylor")
def allocate_taylor(scores: Scores, budget, rungs, time_limit: float, mip_gap: float,
                    tie_fused: bool, tie_experts: bool) -> BitMap:  # fmt: skip
    """Minimum summed ModelOpt gradient score within a real-valued budget in bits per parameter."""
    return _allocate("taylor", scores, budget, rungs, time_limit, mip_gap, tie_fused, tie_experts)


@takes_options("delta_loss")
def allocate_delta_loss(scores: Scores, budget, rungs, time_limit: float, mip_gap: float,
                        tie_fused: bool, tie_experts: bool) -> BitMap:  # fmt: skip
    """Minimum summed AutoScheme delta-loss score within a real-valued budget in bits per parameter."""
    return _allocate("delta_loss", scores, budget, rungs, time_limit, mip_gap, tie_fused, tie_experts)


def _adjust(dkld: float) -> float:
    """ExLlamaV3's damping of improvements (optimize_model.py): a KLD gain counts as gain**0.69."""
    return dkld if dkld > 0 else -((-dkld) ** 0.69)


@takes_options("dkld_greedy")
def allocate_dkld_greedy(scores: Scores, budget) -> BitMap:
    """ExLlamaV3's optimizer (`exllamav3/conversion/optimize_model.py`) on the measured `dkld` column: every
    layer group (attention, MLP) starts at the cheapest measured rung; then, while memory is left, the
    (group, higher rung) with the most negative adjusted dKLD per extra bit that fits is taken. The budget
    is never exceeded; the members of a group (q/k/v/o, gate/up/down) share one rung."""
    import numpy as np

    from tasks.allocation.knapsack import UNITS_PER_BIT, capacity_units, rung_units
    from tasks.errors import PipelineError
    from tasks.ladder import split_key
    from tasks.profiling.dkld import group_of

    scores.require(("dkld",), "dkld_greedy")
    measured = scores.frame.dropna(subset=["dkld"])
    rungs = sorted({r for r in scores.rungs if r.name in set(measured["rung"])}, key=lambda r: r.bpp)
    groups: dict[tuple[int, str], list[str]] = {}
    for key in scores.keys:
        layer, module = split_key(key)
        groups.setdefault((layer, group_of(module)), []).append(key)
    value = measured.drop_duplicates(["layer", "module", "rung"]).set_index(["key", "rung"])["dkld"]
    names = list(groups)
    dkld = np.array([[value.get((groups[g][0], r.name), np.nan) for r in rungs] for g in names])
    if np.isnan(dkld).any():
        raise PipelineError(f"scores table {scores.source} lacks dkld for some layer group and rung: re-profile with dkld_windows")
    sizes = np.array([[sum(scores.params[k] for k in groups[g]) * rung_units(r) for r in rungs] for g in names], dtype=np.int64)
    cap = capacity_units(as_bpp(budget), scores.total_params)
    left = cap - int(sizes[:, 0].sum())
    if left < 0:
        raise PipelineError(f"budget {as_bpp(budget):g} bpp is infeasible for dkld_greedy: its base rung {rungs[0].name} needs "
                            f"{sizes[:, 0].sum() / UNITS_PER_BIT / scores.total_params:.4f} bpp")  # fmt: skip
    solution = [0] * len(names)
    while True:
        best, best_r = None, 0.0
        for i in range(len(names)):
            s = solution[i]
            for j in range(s + 1, len(rungs)):
                dk = _adjust(dkld[i, j]) - (_adjust(dkld[i, s]) if s > 0 else 0.0)
                db = int(sizes[i, j] - sizes[i, s])
                r = 1e10 * dk / (db / UNITS_PER_BIT + 1)
                if r < best_r and db <= left:
                    best, best_r = (i, j, db), r
        if best is None:
            break
        i, j, db = best
        solution[i], left = j, left - db
    modules = {k: rungs[solution[i]] for i, g in enumerate(names) for k in groups[g]}
    bitmap = BitMap(method="dkld_greedy", modules={k: modules[k] for k in scores.keys}, params=dict(scores.params),
                    budget=as_bpp(budget), options={"rungs": [r.name for r in rungs], "error": "dkld"})  # fmt: skip
    return bitmap
