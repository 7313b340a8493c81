"""Which variants a configuration asks for, and their bit maps.

`plan_variants(config)` is pure (no scores, no torch): the (method, budget, options) of every bit map,
uniform baselines first, then the boost methods (whose reached memory sets the equal-memory target of
the budget-exact methods), then the rest. `allocate_variants` turns the plan into bit maps on a scores
table. The pipeline's allocate step and the benchmarks both use these two, so a variant means the same
thing everywhere; its one name is `variant_name(backend, label, budget_label)`, e.g. `hqq/SB30/3.25`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.allocation.methods import METHODS, method_spec
from tasks.errors import PipelineError
from tasks.ladder import Rung, parse_rung
from tasks.orchestration.config import TIE_FUSED_BACKENDS, PipelineConfig, budget_label, parse_budget


@dataclass(frozen=True)
class VariantSpec:
    method: str
    budget: Rung | float
    options: dict = field(default_factory=dict)
    backends: tuple[str, ...] | None = None  # the backends this bit map is for (None: every backend)

    @classmethod
    def of(cls, method: str, budget, options: dict | None = None, backends: tuple[str, ...] | None = None) -> "VariantSpec":
        """The method's defaults under the given options."""
        spec = method_spec(method)
        budget = budget if isinstance(budget, (Rung, float)) else parse_budget(budget)
        return cls(method, budget, {**spec.defaults, **(options or {})}, backends)

    @property
    def label(self) -> str:
        return METHODS[self.method].label(self.options)

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)

    @property
    def name(self) -> str:
        """The bit map's file stem: '<label>-<budget label>', e.g. 'SB30-3.25' ('-tied' with tie_fused,
        '-experts-tied' with tie_experts)."""
        ties = ("-tied" if self.options.get("tie_fused") else "") + ("-experts-tied" if self.options.get("tie_experts") else "")
        return f"{self.label}-{self.budget_label}{ties}"


@dataclass(frozen=True)
class PlannedVariant:
    spec: VariantSpec
    target: float  # the bpp the allocator was given
    bitmap: object  # tasks.bitmap.BitMap


def variant_name(backend: str, label: str, budget: str) -> str:
    return f"{backend}/{label}/{budget}"


def plan_variants(config: PipelineConfig, stacked_family: str | None = None) -> list[VariantSpec]:
    """Uniform first, then the boost methods, then the rest. A method that can tie fused modules gets
    one bit map per tie setting its backends need (tied for TIE_FUSED_BACKENDS, and for every backend
    when the model's family stores q/k/v or gate/up in one linear: `stacked_family`, e.g. phi3), unless
    the user's method_options set tie_fused."""
    specs = [VariantSpec.of("uniform", parse_rung(b)) for b in config.uniform_budgets]
    methods = sorted((m for m in config.methods if m != "uniform"), key=lambda m: not METHODS[m].boost)
    tied = tuple(b for b in config.backends if b in TIE_FUSED_BACKENDS or stacked_family)
    untied = tuple(b for b in config.backends if b not in tied)
    for method in methods:
        options = config.method_options.get(method) or {}
        if stacked_family and options.get("tie_fused") is False:
            raise PipelineError(f"{method}: tie_fused cannot be false for a {stacked_family} model, which stores q/k/v and "
                                "gate/up each in one linear (they share one rung)")  # fmt: skip
        for raw in config.budgets:
            budget = parse_budget(raw)
            if not METHODS[method].ties or "tie_fused" in options or not tied:
                specs.append(VariantSpec.of(method, budget, options))
                continue
            if untied:
                specs.append(VariantSpec.of(method, budget, options, untied))
            specs.append(VariantSpec.of(method, budget, {**options, "tie_fused": True}, tied))
    return specs


def allocate_variants(specs: list[VariantSpec], scores, params: dict[str, int], match_boost_memory: bool = True) -> list[PlannedVariant]:
    """Every spec's bit map. With match_boost_memory, a budget-exact method given a rung gets the memory
    the first boost method reached at that rung (equal-memory comparison)."""
    from tasks.allocation import allocate
    from tasks.bitmap import uniform_bitmap

    reached: dict[tuple, float] = {}  # (rung label, tied) -> bpp the first boost method reached there
    out = []
    for spec in specs:
        method = METHODS[spec.method]
        ties = (bool(spec.options.get("tie_fused")), bool(spec.options.get("tie_experts")))
        where = (spec.budget.label, ties) if isinstance(spec.budget, Rung) else None
        if method.budget == "exact" and where in reached and match_boost_memory:
            target = reached[where]
        else:
            target = spec.budget.bpp if isinstance(spec.budget, Rung) else float(spec.budget)
        if spec.method == "uniform":
            bitmap = uniform_bitmap(params, spec.budget)
        else:
            bitmap = allocate(scores, spec.method, target, spec.options)
        if method.boost:
            reached.setdefault(where, bitmap.nominal_bpp)
        out.append(PlannedVariant(spec, target, bitmap))
    return out
