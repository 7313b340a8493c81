"""MXQ (Zhang et al., ICAART 2025; docs/methods.md §6): the SensiBoost authors' earlier baseline.

One rung per module minimizing the sum of Frobenius errors ||W - dequant(HQQ_rung(W))||_F subject to
total memory <= (1 + tolerance) * params * budget / 8 / 2**20 MiB, as their `_find_optimal_configs_milp`
with `scipy.optimize.milp` (HiGHS). Their tolerance is in percent; ours is a fraction (0.01 = 1%).
"""

from __future__ import annotations

from tasks.allocation.budget import as_bpp, as_rungs
from tasks.allocation.methods import takes_options
from tasks.allocation.program import RungProgram, candidate_rungs
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap
from tasks.errors import PipelineError


@takes_options("mxq")
def allocate_mxq(scores: Scores, budget, tolerance: float, rungs, time_limit: float, mip_gap: float,
                 tie_fused: bool, tie_experts: bool) -> BitMap:  # fmt: skip
    """MXQ bit map for a real-valued budget in bits per parameter.

    mip_gap 0 proves optimality (see tasks.allocation.knapsack); the authors ran HiGHS's default 1e-4.
    tie_fused: q/k/v and gate/up of a layer share one rung (what vLLM's fused kernels need).
    tie_experts: all expert linears of a mixture-of-experts layer share one rung (fused MoE kernels).
    """
    bpp = as_bpp(budget)
    tolerance = float(tolerance)
    if tolerance < 0:
        raise PipelineError(f"tolerance must be >= 0 (a fraction: 0.01 = 1%), got {tolerance}")
    scores.require(["fnorm"], "mxq")
    cand = candidate_rungs(scores, as_rungs(rungs))
    program = RungProgram(scores, scores.rung_matrix("fnorm", cand), cand, "mxq", time_limit=time_limit, mip_gap=float(mip_gap),
                          tie_fused=bool(tie_fused), tie_experts=bool(tie_experts))  # fmt: skip
    return program.allocate(bpp, tolerance, options={"cost": "fnorm"})
