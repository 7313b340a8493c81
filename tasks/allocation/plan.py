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

from tasks.allocation.budget import budget_label, parse_budget, parse_uniform
from tasks.allocation.methods import METHODS, method_spec
from tasks.errors import PipelineError
from tasks.ladder import Preset, Rung, parse_preset
from tasks.quantize.registry import capabilities, ladder_of, own_error_names

BASELINE_METHOD = "unquantized"  # the method of the unquantized base model's variant, `none/unquantized/fp32`


def scored_methods(params) -> list[str]:
    """The selected methods that read the profile (the layer-sensitive ones), when there are budgets for them
    (the budgets, or the llama.cpp presets of the methods given their sizes)."""
    methods = [m for m in params.methods if method_spec(m).scored] if params.budgets else []
    ladders = {ladder_of(b) for b in params.backends}
    has_presets = any(p.ladder in ladders for p in map(parse_preset, params.gguf_presets))
    presets = [m for m in params.preset_methods if method_spec(m).scored] if has_presets else []
    return list(dict.fromkeys(methods + presets))


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
    # A backend with a ladder of its own (gguf) has no rungs but the ones its own errors profile: they are
    # measured whenever it has variants (its uniform maps are realized on them; its importance matrix comes along).
    wanted += [c.own_errors.name for c in map(capabilities, params.backends) if c.own_ladder and c.own_errors and _has_variants(params, c.ladder)]
    own = own_error_names()
    return tuple(e for e in dict.fromkeys(wanted) if e in own)


def _has_variants(params, ladder: str) -> bool:
    """Whether the run plans a bit map on `ladder`: a uniform rung or preset of it, a real-valued budget
    or a rung of it for a layer-sensitive method, or a preset of it."""
    budgets = [parse_budget(b) for b in params.budgets] if [m for m in params.methods if method_spec(m).scored] else []
    return (any(parse_uniform(b).ladder == ladder for b in params.uniform_budgets)
            or any(getattr(b, "ladder", ladder) == ladder for b in budgets)
            or any(p.ladder == ladder for p in map(parse_preset, params.gguf_presets)))  # fmt: skip


@dataclass(frozen=True)
class VariantSpec:
    method: str
    budget: Rung | float | Preset
    options: dict = field(default_factory=dict)
    backends: tuple[str, ...] | None = None  # the backends this bit map is for (None: every backend)
    # For a method that ties nothing itself (lim, zd move whole layers): the ties of the boost bit maps
    # whose memory it matches on its backends (a tied SB30 reaches another memory than an untied one).
    memory_ties: tuple[bool, bool] | None = None
    ladder: str = "hqq"  # whose rungs the bit map holds (its backends' Capabilities.ladder)

    @classmethod
    def of(cls, method: str, budget, options: dict | None = None, backends: tuple[str, ...] | None = None,
           memory_ties: tuple[bool, bool] | None = None, ladder: str = "hqq") -> "VariantSpec":  # fmt: skip
        """The method's defaults under the given options."""
        spec = method_spec(method)
        budget = budget if isinstance(budget, (Rung, float, Preset)) else parse_budget(budget)
        return cls(method, budget, {**spec.defaults, **(options or {})}, backends, memory_ties, getattr(budget, "ladder", ladder))

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
        ladder = f"-{self.ladder}" if self.ladder != "hqq" and not isinstance(self.budget, (Rung, Preset)) and not errors else ""
        return f"{self.label}-{self.budget_label}{ties}{errors}{memory}{ladder}"


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
    specs = []
    for raw in config.uniform_budgets:
        budget = parse_uniform(raw)
        specs.append(VariantSpec.of("preset" if isinstance(budget, Preset) else "uniform", budget, backends=_on_ladder(config, budget.ladder)))
    # llama.cpp's presets, where the run has a backend of their ladder (gguf)
    presets = [p for p in map(parse_preset, config.gguf_presets) if _ladder_backends(config, p.ladder)]
    specs += [VariantSpec.of("preset", p, backends=_on_ladder(config, p.ladder)) for p in presets if p not in [s.budget for s in specs]]
    methods = sorted((m for m in config.methods if METHODS[m].scored), key=lambda m: not METHODS[m].boost)
    for method in methods:
        options = config.method_options.get(method) or {}
        if stacked_family and options.get("tie_fused") is False:
            raise PipelineError(f"{method}: tie_fused cannot be false for a {stacked_family} model, which stores q/k/v and "
                                "gate/up each in one linear (they share one rung)")  # fmt: skip
        groups: dict[tuple, list[str]] = {}  # (ladder, the backends' extra options) -> those backends
        for backend in config.backends:
            extra = backend_options(method, options, backend, stacked_family, profiled_errors)
            groups.setdefault((capabilities(backend).ladder, tuple(sorted(extra.items()))), []).append(backend)
        memory = _memory_groups(config, methods, method, stacked_family)
        for raw in config.budgets:
            budget = parse_budget(raw)
            ladders = {getattr(budget, "ladder", None)} if isinstance(budget, (Rung, Preset)) else {ladder for ladder, _ in groups}
            if memory and ladders == {"hqq"}:
                specs += [VariantSpec.of(method, budget, options, b, ties) for ties, b in memory]
            elif list(groups) == [("hqq", ())] and ladders == {"hqq"}:
                specs.append(VariantSpec.of(method, budget, options))
            else:
                for (ladder, extra), backends in sorted(groups.items(), key=lambda item: (item[0][0] != "hqq", len(item[0][1]))):
                    if ladder in ladders:  # the plain HQQ bit map first
                        specs.append(VariantSpec.of(method, budget, {**options, **dict(extra)}, tuple(backends), ladder=ladder))
    for method in config.preset_methods:  # each at every preset's exact size, on the preset's ladder
        options = config.method_options.get(method) or {}
        for preset in presets:
            backends = _on_ladder(config, preset.ladder)
            extra = {**options, **backend_options(method, options, _ladder_backends(config, preset.ladder)[0], stacked_family, profiled_errors)}
            spec = VariantSpec.of(method, preset, extra, backends)
            if spec not in specs:
                specs.append(spec)
    _check_stems(specs)
    return specs


def _ladder_backends(config, ladder: str) -> tuple[str, ...]:
    return tuple(b for b in config.backends if ladder_of(b) == ladder)


def _on_ladder(config, ladder: str) -> tuple[str, ...] | None:
    """The run's backends that take rungs of `ladder` (None: all of them)."""
    backends = _ladder_backends(config, ladder)
    if not backends:
        raise PipelineError(f"Param uniform_budgets: a {ladder} rung or preset needs a backend of that ladder (add the {ladder} backend)")
    return None if len(backends) == len(config.backends) else backends


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


def allocate_variants(specs: list[VariantSpec], scores, params: dict[str, int], match_boost_memory: bool = True,
                      presets=None, refiner=None) -> list[PlannedVariant]:  # fmt: skip
    """Every spec's bit map. With match_boost_memory, a budget-exact method given a rung gets the memory
    the first boost method reached at that rung (equal-memory comparison; `memory_matches`). A llama.cpp
    preset's bit map comes from `presets(name)` (llama-quantize's own rules), and an exact method given that
    preset as budget gets its linears' size and its embeddings' and output head's types (equal file size).
    A method's measured options (optimal's refine) are applied to its map by `refiner(bitmap, spec)`."""
    from tasks.allocation import allocate
    from tasks.bitmap import uniform_bitmap

    reached: dict[tuple, float] = {}  # (rung label, tied) -> bpp the first boost method reached there
    mixes: dict[str, object] = {}  # preset name -> its bit map
    out = []
    for spec, matched in zip(specs, memory_matches(specs, match_boost_memory)):
        method = METHODS[spec.method]
        where = _memory_key(spec)
        if isinstance(spec.budget, Preset):
            if presets is None:
                raise PipelineError(f"budget {spec.budget.name}: a llama.cpp preset needs the gguf backend's model and profile")
            if spec.budget.name not in mixes:
                mixes[spec.budget.name] = presets(spec.budget.name)
            preset = mixes[spec.budget.name]
            target = preset.nominal_bpp
        elif matched is not None:
            target = reached[where]
        else:
            target = spec.budget.bpp if isinstance(spec.budget, Rung) else float(spec.budget)
        if spec.method == "preset":
            bitmap = preset
        elif not method.scored:  # uniform: the rung everywhere, from the parameter counts alone
            bitmap = uniform_bitmap(params, spec.budget)
            bitmap = scores.realize(bitmap) if scores is not None else bitmap
        else:
            bitmap = allocate(scores, spec.method, target, {k: v for k, v in spec.options.items() if k not in method.measured}, spec.ladder)
            if any(spec.options.get(k) for k in method.measured):
                if refiner is None:
                    raise PipelineError(f"{spec.name}: {', '.join(method.measured)} measures the model, which this allocation was not given")
                bitmap = refiner(bitmap, spec)
            if isinstance(spec.budget, Preset):  # the preset's embeddings and output head: equal file size
                bitmap.options.update({k: v for k, v in preset.options.items() if k in ("token_embd", "output")}, preset_size=spec.budget.name)
        if method.boost:
            reached.setdefault(where, bitmap.nominal_bpp)
        out.append(PlannedVariant(spec, target, bitmap, matched))
    return out
