"""Which variants a configuration asks for, and their bit maps.

`plan_variants(params)` is pure (no scores; asking the backends' capabilities imports torch): the
(method, budget, options) of every bit map, uniform baselines first, then the boost methods (whose
reached memory sets the equal-memory target of the budget-exact methods), then the rest.
`allocate_variants` turns the plan into bit maps on a scores table. The pipeline's allocate step and the
benchmarks both use these two, so a variant means the same thing everywhere; its one name is
`variant_name(backend, label, budget_label, matched)`, e.g. `hqq/SB30/3.25`, or `hqq/optimal/3.25@SB30`
for a budget-exact method given SB30's memory at that rung (`memory_matches`): two runs with other
method sets never give two different models one name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.allocation.budget import budget_label, parse_budget
from tasks.allocation.methods import METHODS, method_spec
from tasks.errors import PipelineError
from tasks.ladder import Rung, parse_rung
from tasks.quantize.registry import capabilities, own_error_names

BASELINE_METHOD = "unquantized"  # the method of the unquantized base model's variant, `none/unquantized/fp32`


def scored_methods(params) -> list[str]:
    """The selected methods that read the profile (the layer-sensitive ones), when there are budgets for them."""
    return [m for m in params.methods if method_spec(m).scored] if params.budgets else []


def wanted_errors(params) -> tuple[str, ...]:
    """Whose own rung errors the profile must also measure (Capabilities.own_errors, e.g. GPTQ's: an extra
    cost of the profile): those a method that prices rungs by error (MethodSpec.errors_option) is given in
    method_options, else those of the run's backends that have them. `params`: the run's config or
    AllocationParams (methods, budgets, method_options, backends)."""
    wanted: list[str] = []
    for method in scored_methods(params):
        spec = method_spec(method)
        if spec.errors_option:
            chosen = (params.method_options.get(method) or {}).get(spec.errors_option)
            backends = (capabilities(b).own_errors for b in params.backends)
            wanted += [chosen] if chosen is not None else [e.name for e in backends if e]
    own = own_error_names()
    return tuple(e for e in dict.fromkeys(wanted) if e in own)


@dataclass(frozen=True)
class VariantSpec:
    method: str
    budget: Rung | float
    options: dict = field(default_factory=dict)
    backends: tuple[str, ...] | None = None  # the backends this bit map is for (None: every backend)
    # For a method that ties nothing itself (lim, zd move whole layers): the ties of the boost bit maps
    # whose memory it matches on its backends (a tied SB30 reaches another memory than an untied one).
    memory_ties: tuple[bool, bool] | None = None

    @classmethod
    def of(cls, method: str, budget, options: dict | None = None, backends: tuple[str, ...] | None = None,
           memory_ties: tuple[bool, bool] | None = None) -> "VariantSpec":  # fmt: skip
        """The method's defaults under the given options."""
        spec = method_spec(method)
        budget = budget if isinstance(budget, (Rung, float)) else parse_budget(budget)
        return cls(method, budget, {**spec.defaults, **(options or {})}, backends, memory_ties)

    @property
    def ties(self) -> tuple[bool, bool]:
        """(tie_fused, tie_experts) of the boost bit maps this one is compared with at equal memory."""
        if self.memory_ties is not None:
            return self.memory_ties
        return bool(self.options.get("tie_fused")), bool(self.options.get("tie_experts"))

    @property
    def label(self) -> str:
        return METHODS[self.method].label(self.options)

    @property
    def budget_label(self) -> str:
        return budget_label(self.budget)

    @property
    def name(self) -> str:
        """The bit map's file stem: '<label>-<budget label>', e.g. 'SB30-3.25' ('-tied' with tie_fused,
        '-experts-tied' with tie_experts; '-tied-memory' for a lim/zd map at the memory of a tied boost map)."""
        ties = ("-tied" if self.options.get("tie_fused") else "") + ("-experts-tied" if self.options.get("tie_experts") else "")
        method, option = METHODS[self.method], METHODS[self.method].errors_option
        chosen = self.options.get(option) if option else None
        errors = f"-{chosen}-errors" if chosen is not None and chosen != method.default(option) else ""
        tied, experts = self.memory_ties or (False, False)
        memory = (("-tied" if tied else "") + ("-experts-tied" if experts else "") + "-memory") if tied or experts else ""
        return f"{self.label}-{self.budget_label}{ties}{errors}{memory}"


@dataclass(frozen=True)
class PlannedVariant:
    spec: VariantSpec
    target: float  # the bpp the allocator was given
    bitmap: object  # tasks.bitmap.BitMap
    matched: str | None = None  # the label of the boost variant whose reached memory `target` is (e.g. "SB30"), or None


def variant_name(backend: str, label: str, budget: str, matched: str | None = None) -> str:
    """'<backend>/<label>/<budget label>', plus '@<boost label>' when the allocator was given the memory that
    boost variant reached at the rung rather than the rung's own bpp: 'hqq/optimal/3.25@SB30'."""
    return f"{backend}/{label}/{budget}" + (f"@{matched}" if matched else "")


def rung_errors(backend: str, profiled_errors: tuple[str, ...]) -> str | None:
    """Whose quantization error prices a backend's rungs: its own (Capabilities.own_errors, e.g. GPTQ's) when
    the profile measured them, else None: the profile's HQQ rungs."""
    own = capabilities(backend).own_errors
    return own.name if own and own.name in profiled_errors else None


def backend_options(method: str, options: dict, backend: str, stacked_family: str | None, profiled_errors: tuple[str, ...]) -> dict:
    """What the backend needs of a method beyond the user's options: q/k/v and gate/up tied (a backend with
    fused serving kernels, and every backend of a `stacked_family` such as phi3), and for a method that
    prices rungs by error (optimal) the backend's own rung errors (when the profile measured them)."""
    spec = METHODS[method]
    extra = {}
    if spec.ties and "tie_fused" not in options and (capabilities(backend).fused_kernels or stacked_family):
        extra["tie_fused"] = True
    errors = rung_errors(backend, profiled_errors)
    if spec.errors_option and spec.errors_option not in options and errors is not None:
        extra[spec.errors_option] = errors
    return extra


def plan_variants(config, stacked_family: str | None = None, profiled_errors: tuple[str, ...] | None = None) -> list[VariantSpec]:
    """Uniform first, then the boost methods, then the rest. A method gets one bit map per set of options
    its backends need (`backend_options`), each for those backends. `config`: the run's config or
    AllocationParams; `profiled_errors`: whose own rung errors the profile holds (default: those the
    configuration asks for)."""
    profiled_errors = wanted_errors(config) if profiled_errors is None else profiled_errors
    specs = [VariantSpec.of("uniform", parse_rung(b)) for b in config.uniform_budgets]
    methods = sorted((m for m in config.methods if METHODS[m].scored), key=lambda m: not METHODS[m].boost)
    for method in methods:
        options = config.method_options.get(method) or {}
        if stacked_family and options.get("tie_fused") is False:
            raise PipelineError(f"{method}: tie_fused cannot be false for a {stacked_family} model, which stores q/k/v and "
                                "gate/up each in one linear (they share one rung)")  # fmt: skip
        groups: dict[tuple, list[str]] = {}  # the backends' extra options -> those backends
        for backend in config.backends:
            extra = backend_options(method, options, backend, stacked_family, profiled_errors)
            groups.setdefault(tuple(sorted(extra.items())), []).append(backend)
        memory = _memory_groups(config, methods, method, stacked_family)
        for raw in config.budgets:
            budget = parse_budget(raw)
            if memory:
                specs += [VariantSpec.of(method, budget, options, b, ties) for ties, b in memory]
            elif list(groups) == [()]:
                specs.append(VariantSpec.of(method, budget, options))
            else:
                for extra, backends in sorted(groups.items(), key=lambda item: len(item[0])):  # the plain bit map first
                    specs.append(VariantSpec.of(method, budget, {**options, **dict(extra)}, tuple(backends)))
    _check_stems(specs)
    return specs


def _check_stems(specs: list[VariantSpec]) -> None:
    """Two different bit maps of one allocation never share a file stem (nor a variant name): budgets such as
    '3.401' and '3.404' both read '3.40'."""
    seen: dict[str, VariantSpec] = {}
    for spec in specs:
        other = seen.setdefault(spec.name, spec)
        if other != spec:
            raise PipelineError(f"Param budgets: two {spec.method} bit maps would both be named {spec.name!r} "
                                f"({other.budget!r} and {spec.budget!r}): give budgets that differ in their first two decimals")  # fmt: skip


def _memory_groups(config, methods: list[str], method: str, stacked_family: str | None) -> list[tuple]:
    """For a budget-exact method that ties nothing (lim, zd) in a run whose boost bit maps are tied on some
    backends: [(ties, backends)], one bit map per memory the boost method reaches; else []."""
    boost = next((m for m in methods if METHODS[m].boost), None)
    if boost is None or METHODS[method].ties or METHODS[method].budget != "exact":
        return []
    options = {**METHODS[boost].defaults, **(config.method_options.get(boost) or {})}
    by_ties: dict[tuple, list[str]] = {}
    for backend in config.backends:
        tied = {**options, **backend_options(boost, options, backend, stacked_family, ())}
        by_ties.setdefault((bool(tied.get("tie_fused")), bool(tied.get("tie_experts"))), []).append(backend)
    if list(by_ties) == [(False, False)]:
        return []
    if len(by_ties) == 1:
        return [(next(iter(by_ties)), None)]
    return [(ties, tuple(backends)) for ties, backends in sorted(by_ties.items())]


def _memory_key(spec: VariantSpec) -> tuple | None:
    return (spec.budget.label, spec.ties) if isinstance(spec.budget, Rung) else None


def memory_matches(specs: list[VariantSpec], match_boost_memory: bool = True) -> list[str | None]:
    """Per spec, the label of the boost variant whose reached memory it is allocated at (None: its own
    budget). Pure, from the plan order (boost methods first): with match_boost_memory, a budget-exact method
    given a rung gets the memory of the first boost spec at that rung with the same ties."""
    first: dict[tuple, str] = {}  # (rung label, ties) -> label of the first boost spec there
    out = []
    for spec in specs:
        method = METHODS[spec.method]
        where = _memory_key(spec)
        out.append(first.get(where) if match_boost_memory and method.budget == "exact" and where is not None else None)
        if method.boost:
            first.setdefault(where, spec.label)
    return out


def allocate_variants(specs: list[VariantSpec], scores, params: dict[str, int], match_boost_memory: bool = True) -> list[PlannedVariant]:
    """Every spec's bit map. With match_boost_memory, a budget-exact method given a rung gets the memory
    the first boost method reached at that rung (equal-memory comparison; `memory_matches`)."""
    from tasks.allocation import allocate
    from tasks.bitmap import uniform_bitmap

    reached: dict[tuple, float] = {}  # (rung label, tied) -> bpp the first boost method reached there
    out = []
    for spec, matched in zip(specs, memory_matches(specs, match_boost_memory)):
        method = METHODS[spec.method]
        where = _memory_key(spec)
        if matched is not None:
            target = reached[where]
        else:
            target = spec.budget.bpp if isinstance(spec.budget, Rung) else float(spec.budget)
        if not method.scored:  # uniform: the rung everywhere, from the parameter counts alone
            bitmap = uniform_bitmap(params, spec.budget)
        else:
            bitmap = allocate(scores, spec.method, target, spec.options)
        if method.boost:
            reached.setdefault(where, bitmap.nominal_bpp)
        out.append(PlannedVariant(spec, target, bitmap, matched))
    return out
