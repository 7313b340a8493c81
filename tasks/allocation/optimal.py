"""The project's budget-exact allocator (issue 7): a multiple-choice knapsack on an estimate of the loss change.

    minimize  sum_m C[m, r_m]   subject to   sum_m bpp(r_m) * params_m <= budget * sum_m params_m

solved exactly with scipy's milp (zero gap; see tasks.allocation.knapsack), for any real budget; memory
is checked in integer units, so the budget is never exceeded. C is the estimated increase of the model's
calibration loss when module m is quantized at rung r, summed over modules (quantization noise of
different modules taken as independent). `objective` chooses the estimate:

- "per_token": C = `taylor_dloss`, the same second-order estimate with g^2 and (dW_r x)^2 multiplied token
  by token before the sum, 1/2 E_t[sum_o g_{t,o}^2 (dW_r x_t)_o^2] (NVIDIA ModelOpt's auto_quantize score),
  on the gradient samples' tokens only; with errors="gptq" `taylor_dloss_gptq` (GPTQ's own errors). It keeps
  what "fisher" drops: a module whose large errors fall on tokens with large gradients costs more.
- "fisher": C = `fisher_dloss`, the second-order Fisher estimate
      1/2 sum_o E[g_o^2] * E[(dW_r x)_o^2]     (nats per calibration token)
  with g the gradient of the calibration NLL at the module's output o, from the profiler's streamed
  backward pass (tasks/profiling/fisher.py; BRECQ's Fisher-weighted output reconstruction error, used
  here to price every rung of every module). It is in the loss's own unit everywhere, so modules of
  different layers and types compare directly: no per-part calibration, no normalization.
- "sensitivity": C = w_m * out_err[m, r], out_err = trace(dW H dW^T) / (tokens * n_out) the module's
  output MSE on calibration activations (the GPTQ/OBQ layer-wise objective), w_m = S_p / sum_{m' in p}
  out_err[m', b4g64] puts it in the unit of SensiBoost's block-output sensitivity S_p of the module's
  part p, measured at b4g64 (o joins attn_in under grouped-query attention). Parts without a usable
  weight get the median weight.
- "output": C = out_err, plain total output MSE.

A table without the column an objective needs falls back along per_token -> fisher -> sensitivity -> output, and
without out_err (the authors' tables) to fnorm**2 = trace(dW dW^T) (output error with H = I); each
fallback is logged and recorded in the bit map's options.

`errors` chooses whose quantization error prices the rungs: "hqq" (the profiler's HQQ rungs) or "gptq"
(the error GPTQ leaves after its error feedback: `fisher_dloss_gptq` / `out_err_gptq`, profiled when a
run has the gptq backend; the pipeline gives the gptq backend's `optimal` these, see docs/methods.md §11).
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.allocation.budget import as_bpp, as_rungs
from tasks.allocation.methods import takes_options
from tasks.allocation.program import RungProgram, candidate_rungs
from tasks.allocation.scores import REFERENCE_RUNG, Scores
from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import split_key

log = logging.getLogger(__name__)

OBJECTIVES = ("per_token", "fisher", "sensitivity", "output")
LOSS_OBJECTIVES = ("per_token", "fisher")  # in nats per calibration token: exp(objective) estimates the perplexity ratio
# whose rung errors -> the suffix of their score columns (gguf: the table's gguf rungs, whose columns are
# ggml's own errors; tasks/profiling/driver.py)
ERRORS = {"hqq": "", "gptq": "_gptq", "gguf": ""}
# The SensiBoost part of each projection (an MoE expert's projections take their layer's MLP parts).
PARTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out", "gate_proj": "mlp_gate",
         "up_proj": "mlp_gate", "down_proj": "mlp_down"}  # fmt: skip


def error_column(scores: Scores, suffix: str = "") -> str:
    if scores.has("out_err" + suffix):
        return "out_err" + suffix
    if suffix:
        raise PipelineError(f"scores table {scores.source} lacks column out_err{suffix}: profile with gptq_errors (a run with the gptq backend does)")
    if not scores.has("fnorm"):
        raise PipelineError(f"scores table {scores.source} lacks column(s) out_err (or fnorm) needed by method 'optimal'")
    log.warning("optimal: %s has no out_err column; using fnorm**2 (output error with isotropic inputs)", scores.source)
    return "fnorm"


def error_matrix(scores: Scores, column: str, rungs) -> np.ndarray:
    values = scores.rung_matrix(column, rungs)
    return values**2 if column == "fnorm" else values


def part_groups(keys: tuple[str, ...], sensitivity: np.ndarray) -> list[list[int]]:
    """Indices of the modules that share one sensitivity measurement, per layer (docs/methods.md §3)."""
    groups: dict[tuple[int, str], list[int]] = {}
    for i, key in enumerate(keys):
        layer, module = split_key(key)
        groups.setdefault((layer, PARTS.get(module.rpartition(".")[2], module)), []).append(i)
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


def module_weights(scores: Scores, column: str) -> np.ndarray | None:
    """The "sensitivity" weights, or None (with a warning) when the table cannot give them."""
    if not scores.has("sensitivity") or REFERENCE_RUNG not in scores.rungs:
        log.warning("optimal: sensitivity weighting needs a sensitivity column and b4g64 rows; using plain output error")
        return None
    sensitivity = _module_sensitivity(scores)
    reference = error_matrix(scores, column, (REFERENCE_RUNG,))[:, 0]
    return sensitivity_weights(scores.keys, sensitivity, reference)


def objective_costs(scores: Scores, objective: str, rungs: tuple, errors: str = "hqq") -> tuple[np.ndarray, dict]:
    """The cost matrix C [modules, rungs] of `objective` (see the module docstring), and what was used."""
    if objective not in OBJECTIVES:
        raise PipelineError(f"unknown objective {objective!r} for method 'optimal': one of {', '.join(OBJECTIVES)}")
    if errors not in ERRORS:
        raise PipelineError(f"unknown errors {errors!r} for method 'optimal': one of {', '.join(ERRORS)}")
    suffix = ERRORS[errors]
    if objective == "per_token":
        if scores.has("taylor_dloss" + suffix):
            return scores.rung_matrix("taylor_dloss" + suffix, rungs), {"objective_name": "per_token", "error": "taylor_dloss" + suffix}
        log.warning("optimal: %s has no taylor_dloss%s column (profiled without rival scores?); using the fisher objective", scores.source, suffix)
        objective = "fisher"
    if objective == "fisher":
        if scores.has("fisher_dloss" + suffix):
            return scores.rung_matrix("fisher_dloss" + suffix, rungs), {"objective_name": "fisher", "error": "fisher_dloss" + suffix}
        log.warning("optimal: %s has no fisher_dloss%s column (profiled without gradients?); using the sensitivity objective", scores.source, suffix)
        objective = "sensitivity"
    column = error_column(scores, suffix)
    errors = error_matrix(scores, column, rungs)
    facts = {"error": column if column != "fnorm" else "fnorm^2"}
    if objective == "sensitivity":
        weights = module_weights(scores, column)
        if weights is not None:
            return weights[:, None] * errors, {"objective_name": "sensitivity", **facts}
    return errors, {"objective_name": "output", **facts}


def _module_sensitivity(scores: Scores) -> np.ndarray:
    rows = scores.frame[scores.frame["rung"] == REFERENCE_RUNG.name].set_index("key")["sensitivity"]
    return rows.reindex(list(scores.keys)).to_numpy(dtype=float)  # NA stays NA: the median weight covers it


@takes_options("optimal")
def build_program(scores: Scores, objective: str, rungs, time_limit: float, mip_gap: float,
                  tie_fused: bool, tie_experts: bool, errors: str) -> tuple[RungProgram, dict]:  # fmt: skip
    """The knapsack of `optimal` for one table; reused for every budget of a frontier."""
    cand = candidate_rungs(scores, as_rungs(rungs) or ("gguf" if errors == "gguf" else None))
    costs, facts = objective_costs(scores, objective, cand, errors)
    program = RungProgram(scores, costs, cand, "optimal", time_limit=time_limit, mip_gap=float(mip_gap), tie_fused=bool(tie_fused),
                          tie_experts=bool(tie_experts))  # fmt: skip
    return program, facts


@takes_options("optimal")
def allocate_optimal(scores: Scores, budget, objective: str, rungs, time_limit: float, mip_gap: float,
                     tie_fused: bool, tie_experts: bool, errors: str) -> BitMap:  # fmt: skip
    """The exact minimum-estimated-loss bit map within a real-valued budget in bits per parameter.
    tie_fused: q/k/v and gate/up of a layer share one rung (what vLLM's fused kernels need).
    tie_experts: all expert linears of a mixture-of-experts layer share one rung (fused MoE kernels).
    errors: whose quantization error prices the rungs, "hqq" or "gptq" (the module docstring)."""
    program, facts = build_program(scores, objective, rungs, time_limit, mip_gap, tie_fused, tie_experts, errors)
    return program.allocate(as_bpp(budget), options=facts)


@takes_options("optimal")
def frontier(scores: Scores, budgets, objective: str, rungs, time_limit: float, mip_gap: float,
             tie_fused: bool, tie_experts: bool, errors: str) -> list[BitMap]:  # fmt: skip
    """`allocate_optimal` for each budget of a list, sharing one set-up; every budget is checked first
    (one below the cheapest allocation is a one-line error naming that minimum)."""
    program, facts = build_program(scores, objective, rungs, time_limit, mip_gap, tie_fused, tie_experts, errors)
    return program.allocate_many([as_bpp(b) for b in budgets], options=facts)


def predicted_loss_increase(scores: Scores, bitmap: BitMap, errors: str | None = "hqq", objective: str = "fisher") -> float | None:
    """The estimate of the calibration loss increase (nats per token) of any bit map: the sum of
    `fisher_dloss` (objective "per_token": `taylor_dloss`; with errors="gptq" their `_gptq` columns; None:
    the profile's own HQQ rungs) at each module's rung, what `optimal` minimizes. None when the table has
    no such column or a module's rung was not profiled."""
    column = ("taylor_dloss" if objective == "per_token" else "fisher_dloss") + (ERRORS[errors] if errors else "")
    if not scores.has(column):
        return None
    rungs = tuple(sorted(set(bitmap.modules.values()), key=lambda r: r.bpp))
    if any(r not in scores.rungs for r in rungs) or set(bitmap.modules) != set(scores.keys):
        return None
    matrix = scores.rung_matrix(column, rungs)
    position = {r: j for j, r in enumerate(rungs)}
    return float(sum(matrix[i, position[bitmap.modules[k]]] for i, k in enumerate(scores.keys)))
