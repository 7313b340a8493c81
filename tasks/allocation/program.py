"""A scores table plus a cost matrix as a knapsack over rungs: the shared set-up of MXQ and `optimal`.

Built once per (table, cost, candidate rungs); `allocate(budget)` solves for one budget in bits per
parameter and returns the bit map, so a frontier over many budgets reuses everything but the cap.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.allocation.knapsack import UNITS_PER_BIT, ChoiceKnapsack, capacity_units, size_matrix
from tasks.allocation.scores import Scores
from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import Rung, fused_groups

log = logging.getLogger(__name__)


class RungProgram:
    """With tie_fused, the modules a serving engine fuses (q/k/v, gate/up of a layer) are one knapsack
    item: their costs and sizes add up and they get one rung, so the solve stays exact; with tie_experts,
    so are all expert linears of a mixture-of-experts layer."""

    def __init__(self, scores: Scores, costs: np.ndarray, rungs: tuple[Rung, ...], method: str, time_limit: float | None = 60.0,
                 mip_gap: float = 0.0, tie_fused: bool = False, tie_experts: bool = False):  # fmt: skip
        self.scores, self.rungs, self.method = scores, tuple(rungs), method
        self.tie_fused, self.tie_experts = bool(tie_fused), bool(tie_experts)
        self.groups = fused_groups(scores.keys, self.tie_fused, self.tie_experts)
        self.written = scores.written(self.rungs)  # a gguf type's fallback where a module's rows do not take it
        sizes = size_matrix([scores.params[k] for k in scores.keys], self.rungs, self.written)
        costs = np.stack([np.asarray(costs)[g].sum(axis=0) for g in self.groups])
        self.knapsack = ChoiceKnapsack(costs, np.stack([sizes[g].sum(axis=0) for g in self.groups]), time_limit=time_limit, mip_rel_gap=mip_gap)

    def _bpp(self, units: int) -> float:
        return units / UNITS_PER_BIT / self.scores.total_params

    @property
    def min_bpp(self) -> float:
        """The cheapest allocation: every module at its smallest candidate rung."""
        return self._bpp(self.knapsack.min_units)

    @property
    def saturation_bpp(self) -> float:
        """Above this budget the unconstrained optimum fits and more memory buys nothing."""
        return self._bpp(self.knapsack.free_units)

    def check(self, budget: float, tolerance: float = 0.0) -> int:
        cap = capacity_units(budget, self.scores.total_params, tolerance)
        if cap < self.knapsack.min_units:
            slack = f" with tolerance {tolerance:g}" if tolerance else ""
            raise PipelineError(
                f"budget {budget:g} bpp{slack} is infeasible for {self.method}: the cheapest allocation over rungs "
                f"{','.join(r.name for r in self.rungs)} needs {self.min_bpp:.4f} bpp"
            )
        return cap

    def allocate(self, budget: float, tolerance: float = 0.0, options: dict | None = None) -> BitMap:
        cap = self.check(budget, tolerance)
        choice, facts = self.knapsack.solve(cap)
        return self._bitmap(choice, budget, tolerance, facts, options)

    def allocate_many(self, budgets: list[float], options: dict | None = None) -> list[BitMap]:
        """One bit map per budget (in the order given). Solved from the smallest budget up, so that a
        solve stopped by the time limit never returns worse than a smaller budget's allocation, which
        also fits: the frontier's objective is non-increasing in the budget."""
        caps = [self.check(b) for b in budgets]
        results: dict[int, BitMap] = {}
        best = None
        for i in sorted(range(len(budgets)), key=lambda i: caps[i]):
            choice, facts = self.knapsack.solve(caps[i])
            if best is not None and self.knapsack.cost(best[0]) < self.knapsack.cost(choice):
                choice, facts = best[0], {**best[1], "status": f"{facts['status']}; kept a smaller budget's allocation"}
            best = (choice, facts)
            results[i] = self._bitmap(choice, budgets[i], 0.0, facts, options)
        return [results[i] for i in range(len(budgets))]

    def _bitmap(self, choice, budget: float, tolerance: float, facts: dict, options: dict | None) -> BitMap:
        modules = {self.scores.keys[i]: self.written[i][j] for group, j in zip(self.groups, choice) for i in group}
        modules = {k: modules[k] for k in self.scores.keys}
        options = {
            **(options or {}),
            **({"tie_fused": True} if self.tie_fused else {}),
            **({"tie_experts": True} if self.tie_experts else {}),
            "rungs": [r.name for r in self.rungs],
            "objective": self.knapsack.cost(choice),
            "solver": facts,
        }
        if tolerance:
            options["tolerance"] = tolerance
        bitmap = BitMap(method=self.method, modules=modules, params=dict(self.scores.params), budget=budget, options=options)
        log.info("%s: budget %.4f bpp -> %.4f bpp, objective %.6g", self.method, budget, bitmap.nominal_bpp, options["objective"])
        return bitmap


def candidate_rungs(scores: Scores, rungs: tuple[Rung, ...] | str | None) -> tuple[Rung, ...]:
    """The candidates asked for (default: every HQQ rung the table has; a ladder's name: every rung of that
    ladder it has), all of which the table must hold."""
    if rungs is None or isinstance(rungs, str):
        found = scores.ladder_rungs(rungs or "hqq")
        if not found:
            raise PipelineError(f"scores table {scores.source} has no rungs of the {rungs or 'hqq'} ladder"
                                + (" (profile with gguf_errors: a run with the gguf backend does)" if rungs == "gguf" else ""))
        return found
    absent = [r.name for r in rungs if r not in scores.rungs]
    if absent:
        raise PipelineError(f"scores table {scores.source} has no rows for candidate rung(s) {', '.join(absent)}")
    return rungs
