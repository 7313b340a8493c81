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
from tasks.allocation.program import RungProgram, candidate_rungs
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap

COLUMN = {"taylor": "taylor_dloss", "delta_loss": "delta_loss"}


def _allocate(method: str, scores: Scores, budget, rungs, time_limit: float, mip_gap: float, tie_fused: bool) -> BitMap:
    scores.require((COLUMN[method],), method)
    cand = candidate_rungs(scores, as_rungs(rungs))
    program = RungProgram(scores, scores.rung_matrix(COLUMN[method], cand), cand, method, time_limit=time_limit,
                          mip_gap=float(mip_gap), tie_fused=bool(tie_fused))  # fmt: skip
    return program.allocate(as_bpp(budget), options={"error": COLUMN[method]})


def allocate_taylor(scores: Scores, budget, rungs=None, time_limit: float = 60.0, mip_gap: float = 0.0,
                    tie_fused: bool = False) -> BitMap:  # fmt: skip
    """Minimum summed ModelOpt gradient score within a real-valued budget in bits per parameter."""
    return _allocate("taylor", scores, budget, rungs, time_limit, mip_gap, tie_fused)


def allocate_delta_loss(scores: Scores, budget, rungs=None, time_limit: float = 60.0, mip_gap: float = 0.0,
                        tie_fused: bool = False) -> BitMap:  # fmt: skip
    """Minimum summed AutoScheme delta-loss score within a real-valued budget in bits per parameter."""
    return _allocate("delta_loss", scores, budget, rungs, time_limit, mip_gap, tie_fused)
