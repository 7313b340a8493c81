"""The project's budget-exact allocator (issue 7): a multiple-choice knapsack on an estimate of the loss change.

    minimize  sum_m w_m * E[m, r_m]   subject to   sum_m bpp(r_m) * params_m <= budget * sum_m params_m

solved exactly with scipy's milp (zero gap; see tasks.allocation.knapsack), for any real budget; memory
is checked in integer units, so the budget is never exceeded. E is `out_err`, the mean squared error a
rung causes in the module's output on calibration activations, trace(dW H dW^T) / n_out (H the input
second moment), i.e. the GPTQ/OBQ layer-wise objective. Without `out_err` it falls back to
fnorm**2 = trace(dW dW^T), the same quantity with H = I (isotropic inputs), and says so.

Weights (`weighting`):
- "sensitivity" (default). E is in each module's own output units (query logits, MLP hidden units,
  residual-stream units), so plain sums of E compare unlike things. SensiBoost's `sensitivity` S_p is
  measured where every part lands, at its block's contribution to the residual stream (o_proj or
  down_proj output), when part p (attn_in = q,k,v; attn_out = o; mlp_gate = gate,up; mlp_down = down;
  o joins attn_in under grouped-query attention, where it carries attn_in's score) is quantized at
  b4g64: one common unit across parts and layers. We propagate each module's error to that point to
  first order, calibrated at the one rung where both are measured: quantization noise of different
  modules is independent, so output MSEs add, and the block error is proportional to the module errors,
  w_m = S_p / sum_{m' in p} E[m', b4g64]. At b4g64 the estimate of part p is exactly S_p; another rung
  scales it by how much that rung changes the module's own output error. Parts whose weight cannot be
  formed (no error at b4g64, S <= 0 or NA) get the median weight; without a sensitivity column (or
  without b4g64 rows) this falls back to "uniform", with a warning.
- "uniform": w_m = 1, the total (per output element) output MSE over modules.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.allocation.budget import as_bpp, as_rungs
from tasks.allocation.program import RungProgram, candidate_rungs
from tasks.allocation.scores import REFERENCE_RUNG, Scores
from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import split_key

log = logging.getLogger(__name__)

WEIGHTINGS = ("sensitivity", "uniform")
PARTS = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_gate",
    "mlp.up_proj": "mlp_gate",
    "mlp.down_proj": "mlp_down",
}


def error_column(scores: Scores) -> str:
    if scores.has("out_err"):
        return "out_err"
    if not scores.has("fnorm"):
        raise PipelineError(f"scores table {scores.source} lacks column(s) out_err (or fnorm) needed by method 'optimal'")
    log.warning("optimal: %s has no out_err column; using fnorm**2 (output error with isotropic inputs)", scores.source)
    return "fnorm"


def error_matrix(scores: Scores, column: str, rungs) -> np.ndarray:
    values = scores.rung_matrix(column, rungs)
    return values**2 if column == "fnorm" else values


def part_groups(keys: tuple[str, ...], sensitivity: np.ndarray) -> list[list[int]]:
    """Indices of the modules that share one sensitivity measurement, per layer (SPEC section 3)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, key in enumerate(keys):
        layer, module = split_key(key)
        groups.setdefault((layer, PARTS.get(module, module)), []).append(i)
    for (layer, part), members in list(groups.items()):  # GQA: o_proj carries attn_in's score
        attn_in = groups.get((layer, "attn_in"))
        if part == "attn_out" and attn_in and all(sensitivity[i] == sensitivity[attn_in[0]] for i in members):
            attn_in.extend(members)
            del groups[(layer, part)]
    return list(groups.values())


def sensitivity_weights(keys: tuple[str, ...], sensitivity: np.ndarray, reference_error: np.ndarray) -> np.ndarray:
    """w_m = S_part / sum of the part's errors at b4g64 (see the module docstring); median where undefined."""
    weights = np.full(len(keys), np.nan)
    for members in part_groups(keys, sensitivity):
        s = float(np.mean(sensitivity[members]))
        denom = float(np.sum(reference_error[members]))
        if np.isfinite(s) and s > 0 and np.isfinite(denom) and denom > 0:
            weights[members] = s / denom
    valid = np.isfinite(weights)
    if not valid.any():
        log.warning("optimal: no usable sensitivity weight; using uniform weights")
        return np.ones(len(keys))
    if not valid.all():
        log.warning("optimal: %d module(s) without a usable sensitivity weight get the median weight", int((~valid).sum()))
        weights[~valid] = np.median(weights[valid])
    return weights


def module_weights(scores: Scores, column: str, weighting: str) -> tuple[np.ndarray, str]:
    if weighting not in WEIGHTINGS:
        raise PipelineError(f"unknown weighting {weighting!r}: one of {', '.join(WEIGHTINGS)}")
    if weighting == "uniform":
        return np.ones(len(scores.keys)), "uniform"
    if not scores.has("sensitivity") or REFERENCE_RUNG not in scores.rungs:
        log.warning("optimal: sensitivity weighting needs a sensitivity column and b4g64 rows; using uniform weights")
        return np.ones(len(scores.keys)), "uniform"
    sensitivity = _module_sensitivity(scores)
    reference = error_matrix(scores, column, (REFERENCE_RUNG,))[:, 0]
    return sensitivity_weights(scores.keys, sensitivity, reference), "sensitivity"


def _module_sensitivity(scores: Scores) -> np.ndarray:
    rows = scores.frame[scores.frame["rung"] == REFERENCE_RUNG.name].set_index("key")["sensitivity"]
    return rows.reindex(list(scores.keys)).to_numpy(dtype=float)  # NA stays NA: the median weight covers it


def build_program(scores: Scores, weighting: str = "sensitivity", rungs=None, time_limit: float = 60.0, mip_gap: float = 0.0) -> tuple[RungProgram, dict]:
    """The knapsack of `optimal` for one table; reused for every budget of a frontier."""
    column = error_column(scores)
    cand = candidate_rungs(scores, as_rungs(rungs))
    weights, used = module_weights(scores, column, weighting)
    costs = weights[:, None] * error_matrix(scores, column, cand)
    facts = {"error": "out_err" if column == "out_err" else "fnorm^2", "weighting": used}
    return RungProgram(scores, costs, cand, "optimal", time_limit=time_limit, mip_gap=float(mip_gap)), facts


def allocate_optimal(scores: Scores, budget, weighting: str = "sensitivity", rungs=None, time_limit: float = 60.0, mip_gap: float = 0.0) -> BitMap:
    """The exact minimum-estimated-loss bit map within a real-valued budget in bits per parameter."""
    program, facts = build_program(scores, weighting, rungs, time_limit, mip_gap)
    return program.allocate(as_bpp(budget), options=facts)


def frontier(scores: Scores, budgets, weighting: str = "sensitivity", rungs=None, time_limit: float = 60.0, mip_gap: float = 0.0) -> list[BitMap]:
    """`allocate_optimal` for each budget of a list, sharing one set-up; every budget is checked first
    (one below the cheapest allocation is a one-line error naming that minimum)."""
    program, facts = build_program(scores, weighting, rungs, time_limit, mip_gap)
    return program.allocate_many([as_bpp(b) for b in budgets], options=facts)
