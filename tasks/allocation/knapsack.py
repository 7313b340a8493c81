"""Multiple-choice knapsack, solved exactly: one rung per module, minimum total cost within a memory cap.

    minimize  sum_i c[i, j_i]   subject to  sum_i s[i, j_i] <= capacity,  one j_i per module i

the binary program of MXQ (Zhang et al., ICAART 2025), solved with `scipy.optimize.milp` (HiGHS).

Exactness and speed. A generic MIP solver finds near-optimal allocations at once but can take minutes
to prove the last 1e-5 of optimality on tables with many near-ties. So: (1) a quick solve with a 1e-4
gap gives an incumbent (upper bound UB); (2) the Lagrangian relaxation of the memory constraint gives
a lower bound LB and, per candidate, its reduced cost d; a candidate with LB + d > UB cannot be in any
optimal solution and is dropped (reduced-cost fixing, exact); (3) the remaining core is solved with a
zero gap. Memory is counted in integer units of 1/512 bit (bpp * 512 is an integer on every rung), so
"never over the cap" is checked exactly after the solver, not up to its tolerances. Candidates dominated
within a module (no cheaper and no smaller) are dropped up front. The set-up is built once and
`solve(capacity)` may be called for many capacities, which is what a budget frontier needs.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from fractions import Fraction

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from tasks.errors import PipelineError
from tasks.ladder import GGML_BLOCKS, Rung

log = logging.getLogger(__name__)

UNITS_PER_BIT = 512
QUICK_GAP = 1e-4  # HiGHS's default gap: the incumbent of phase 1 (the authors' MXQ setting)
# Above this many modules (a mixture-of-experts model: 18,624 for Qwen3-30B-A3B) phase 1's generic solve can
# use the whole time limit without finding a feasible point; the Lagrangian greedy incumbent takes
# milliseconds and is within one module's step of the LP bound, so the exact core stays small.
GREEDY_ABOVE = 4096
_REPAIRS = 5  # re-solves with a tighter cap if HiGHS's feasibility tolerance let the cap slip


def rung_units(rung: Rung) -> int:
    """bpp * 512 of a rung, exactly."""
    if rung.ggml:  # a llama.cpp type: its bytes per block of weights
        block, size = GGML_BLOCKS[rung.ggml]
        units = Fraction(8 * size, block) * UNITS_PER_BIT
    else:
        units = (Fraction(rung.bits) + Fraction(16, rung.group_size) + Fraction(32, rung.group_size * 128)) * UNITS_PER_BIT
    if units.denominator != 1:
        raise PipelineError(f"rung {rung.name} has no whole number of 1/{UNITS_PER_BIT}-bit units")
    return int(units)


def size_matrix(params: list[int], rungs: tuple[Rung, ...], written: list[list[Rung]] | None = None) -> np.ndarray:
    """Memory of each (module, rung) in units, int64, shape (len(params), len(rungs)); with `written`
    (per module, the rung actually written for each of `rungs`), of those."""
    if written is None:
        return np.outer(np.asarray(params, dtype=np.int64), np.array([rung_units(r) for r in rungs], dtype=np.int64))
    return np.array([[n * rung_units(w) for w in row] for n, row in zip(params, written)], dtype=np.int64).reshape(len(params), len(rungs))


def capacity_units(budget_bpp: float, total_params: int, tolerance: float = 0.0) -> int:
    """floor((1 + tolerance) * budget * params) in units, computed in exact rational arithmetic."""
    cap = (1 + Fraction(tolerance)) * Fraction(budget_bpp) * total_params * UNITS_PER_BIT
    return int(cap.numerator // cap.denominator)


def pareto_candidates(costs: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Indices of the candidates of one module that no other candidate beats on both cost and size."""
    keep, best = [], np.inf
    for j in np.lexsort((costs, sizes)):  # by size, then cost
        if costs[j] < best:
            keep.append(j)
            best = costs[j]
    return np.array(sorted(keep), dtype=int)


def lagrangian_bound(costs: np.ndarray, sizes: np.ndarray, mask: np.ndarray, capacity: int,
                     feasible: bool = False) -> tuple[float, np.ndarray] | np.ndarray:  # fmt: skip
    """max over lambda >= 0 of  sum_i min_j (c + lambda s) - lambda * capacity  (the LP bound of the
    multiple-choice knapsack), and the reduced costs d = (c + lambda s) - row minimum at that lambda.
    With `feasible`, instead the choice minimizing c + lambda s at the smallest bracketed lambda whose
    choice fits the capacity (the greedy solution of the relaxation, rounded down)."""
    c = np.where(mask, costs, np.inf)
    s = sizes.astype(float)
    rows = np.arange(len(c))

    def at(lam: float) -> tuple[float, float, np.ndarray]:
        v = c + lam * s
        j = v.argmin(axis=1)
        return float(v[rows, j].sum() - lam * capacity), float(s[rows, j].sum()), v

    lo, hi = 0.0, 1.0
    if at(0.0)[1] <= capacity:
        lo = hi = 0.0
    else:
        while at(hi)[1] > capacity:
            hi *= 2.0
        for _ in range(200):  # the used size falls as lambda grows; bracket the crossing
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if at(mid)[1] > capacity else (lo, mid)
    if feasible:
        return at(hi)[2].argmin(axis=1)
    bound, lam = max((at(lo)[0], lo), (at(hi)[0], hi))
    v = at(lam)[2]
    return bound, v - v.min(axis=1, keepdims=True)


@contextmanager
def _captured_stdout():
    """HiGHS (as bundled with scipy) sometimes writes debug lines to the C-level stdout; keep them
    out of the CLI's result line and log them at debug level instead."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            sink.seek(0)
            noise = sink.read().decode(errors="replace").strip()
            if noise:
                log.debug("HiGHS: %s", noise)


class ChoiceKnapsack:
    """The program for one cost matrix; `solve(capacity)` may be called for many capacities."""

    def __init__(self, costs: np.ndarray, sizes: np.ndarray, time_limit: float | None = 60.0, mip_rel_gap: float = 0.0):
        costs = np.asarray(costs, dtype=float)
        sizes = np.asarray(sizes, dtype=np.int64)
        if costs.shape != sizes.shape or costs.ndim != 2 or costs.size == 0:
            raise PipelineError(f"knapsack needs equal, non-empty cost and size matrices (got {costs.shape}, {sizes.shape})")
        if not np.isfinite(costs).all():
            raise PipelineError("knapsack costs must be finite numbers")
        self.costs, self.sizes = costs, sizes
        self.time_limit, self.mip_rel_gap = time_limit, float(mip_rel_gap)
        self.mask = np.zeros(costs.shape, dtype=bool)
        for i in range(len(costs)):
            self.mask[i, pareto_candidates(costs[i], sizes[i])] = True
        self.min_units = int(sizes.min(axis=1).sum())
        self.free_choice = costs.argmin(axis=1)  # the unconstrained optimum (first minimum per module)
        self.free_units = self.units(self.free_choice)

    def cost(self, choice: np.ndarray) -> float:
        return float(self.costs[np.arange(len(choice)), choice].sum())

    def units(self, choice: np.ndarray) -> int:
        return int(self.sizes[np.arange(len(choice)), choice].sum())

    def solve(self, capacity: int) -> tuple[np.ndarray, dict]:
        """Column index per module of an optimal choice within `capacity` units, and solver facts.

        `time_limit` bounds the whole call; on expiry the best feasible choice found is returned with
        status "time_limit" (it is then within the quick phase's 1e-4 gap, but not proven optimal)."""
        if capacity < self.min_units:
            raise PipelineError(f"knapsack capacity {capacity} is below the smallest possible total {self.min_units}")
        if capacity >= self.free_units:
            return self.free_choice.copy(), {"status": "optimal", "mip_gap": 0.0, "core": 0}
        deadline = None if not self.time_limit else time.monotonic() + float(self.time_limit)
        best, status = self._incumbent(capacity, deadline)
        facts = {"status": status, "mip_gap": max(self.mip_rel_gap, QUICK_GAP), "core": int(self.mask.sum())}
        if self.mip_rel_gap >= QUICK_GAP:
            return best, facts
        upper = self.cost(best)
        lower, reduced = lagrangian_bound(self.costs, self.sizes, self.mask, capacity)
        slack = 1e-9 * (abs(upper) + abs(lower)) + 1e-300
        core = self.mask & (lower + reduced <= upper + slack)
        core[np.arange(len(best)), best] = True  # the incumbent always stays feasible
        facts.update(core=int(core.sum()), status="optimal")  # incumbent at the bound, or alone in the core: proven
        log.debug("knapsack: LB %.9g, UB %.9g, core %d of %d candidates", lower, upper, core.sum(), self.mask.sum())
        if upper > lower + slack and (core.sum(axis=1) > 1).any():
            choice, facts["status"] = self._solve_within(core, capacity, self.mip_rel_gap, deadline, spread=upper - lower)
            if choice is not None and self.cost(choice) < upper:
                best = choice
        cost = self.cost(best)
        facts["lp_gap"] = max((cost - lower) / abs(cost), 0.0) if cost else 0.0  # distance to the LP bound
        if facts["status"] == "optimal":
            facts["mip_gap"] = self.mip_rel_gap
        else:  # the LP bound still bounds the distance to the optimum
            log.warning("knapsack: time limit reached; the allocation is feasible and within %.1e (relative) of the optimum, "
                        "not proven optimal", facts["lp_gap"])  # fmt: skip
        return best, facts

    def _incumbent(self, capacity: int, deadline: float | None) -> tuple[np.ndarray, str]:
        """Phase 1: a good feasible choice, fast (HiGHS with the quick gap; for very many modules the
        Lagrangian greedy choice, then filled: see GREEDY_ABOVE)."""
        if len(self.costs) <= GREEDY_ABOVE:
            return self._solve_within(self.mask, capacity, max(self.mip_rel_gap, QUICK_GAP), deadline)
        return self._fill(lagrangian_bound(self.costs, self.sizes, self.mask, capacity, feasible=True), capacity), "optimal"

    def _fill(self, choice: np.ndarray, capacity: int) -> np.ndarray:
        """Spend the units `choice` leaves under the cap: repeatedly take the single-module change with the
        largest cost decrease per extra unit that still fits, until none does."""
        choice = choice.copy()
        rows = np.arange(len(choice))
        cost = np.where(self.mask, self.costs, np.inf)
        while True:
            left = capacity - self.units(choice)
            extra = self.sizes - self.sizes[rows, choice][:, None]
            gain = cost[rows, choice][:, None] - cost
            ok = (extra > 0) & (extra <= left) & (gain > 0)
            if not ok.any():
                return choice
            rate = np.where(ok, gain / np.maximum(extra, 1), -np.inf)
            i, j = np.unravel_index(int(rate.argmax()), rate.shape)
            choice[i] = j

    def _solve_within(self, mask: np.ndarray, capacity: int, gap: float, deadline: float | None,
                      spread: float = 0.0) -> tuple[np.ndarray | None, str]:  # fmt: skip
        rows, cols = np.nonzero(mask)  # row-major: each module's candidates are contiguous
        n = len(self.costs)
        starts = np.searchsorted(rows, np.arange(n + 1))
        shifted = self.costs[rows, cols] - np.where(mask, self.costs, np.inf).min(axis=1)[rows]
        scale = spread if spread > 0 else (shifted.max() or 1.0)
        c = shifted / scale * 1e3  # numbers HiGHS handles well; its absolute gap 1e-6 becomes negligible
        # Memory in whole multiples of the sizes' gcd: the row activity is an integer, so HiGHS's
        # feasibility tolerance cannot carry it over the cap (checked again below all the same).
        unit = int(np.gcd.reduce(self.sizes[mask]))
        sizes = self.sizes[rows, cols] // unit
        one_each = LinearConstraint(csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(n, len(rows))), lb=1, ub=1)
        cap = capacity // unit
        for _ in range(_REPAIRS):
            options = {"mip_rel_gap": gap, "presolve": True}
            if deadline is not None:
                options["time_limit"] = max(deadline - time.monotonic(), 1.0)
            memory = LinearConstraint(sizes.astype(float).reshape(1, -1), lb=-np.inf, ub=float(cap))
            with _captured_stdout():
                res = milp(c=c, constraints=[one_each, memory], integrality=np.ones_like(c), bounds=Bounds(0, 1), options=options)
            if res.x is None:
                if res.status == 2:
                    raise PipelineError("knapsack is infeasible at this capacity")
                if res.status == 1 and spread > 0:  # the exact phase ran out of time: the caller keeps its incumbent
                    return None, "time_limit"
                raise PipelineError(f"knapsack solver failed: {res.message}")
            choice = np.array([cols[starts[i] + int(np.argmax(res.x[starts[i] : starts[i + 1]]))] for i in range(n)])
            over = self.units(choice) - capacity
            if over <= 0:
                return choice, "optimal" if res.status == 0 else "time_limit"
            log.debug("knapsack: %d units over the cap (solver tolerance); re-solving tighter", over)
            cap -= -(-over // unit)
        raise PipelineError(f"knapsack: the solver kept exceeding the cap of {capacity} units")
