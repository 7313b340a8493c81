"""What the pipeline knows about each allocation method without running it: its budget kind, its default
options and its label. One table, read by the allocator registry, the variant planner, the DAG's Params
and the benchmarks; light on purpose (no numpy, no torch), so that planning runs in the Airflow image.

Budget kinds:
  rung   the budget must be a ladder rung; boost methods may exceed it (the extra memory is reported)
  exact  any real bits-per-parameter budget, never exceeded

Each option's JSON schema carries its default: the allocators take their keyword defaults from here
(`takes_options`), and `check_options` is the one check of a method's options, for the pipeline's Params
and for the allocation API alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    name: str
    budget: str  # "rung" or "exact"
    boost: bool = False  # spends extra memory on outlier layers above the budget rung
    summary: str = ""
    ties: bool = False  # takes tie_fused (q/k/v and gate/up of a layer on one rung, for fused serving kernels)
    options: dict = field(default_factory=dict)  # option -> JSON schema of its value with its "default" (the allocator's keyword arguments)
    # options the allocation stage applies to the allocator's map with the model (optimal's refine): schemas, as above
    measured: dict = field(default_factory=dict)
    # The options whose defaults every variant records, as they name it (SB30: boost_stop 3, top_m 0).
    named: tuple[str, ...] = ()
    rival_scores: bool = False  # needs a profile with the rival allocators' scores (an extra cost of the backward pass)
    # (option, its values) that read those scores too (optimal's objective "per_token": their per-token product)
    token_scores: tuple[str, tuple[str, ...]] | None = None
    dkld: bool = False  # needs a profile with ExLlamaV3's measured KLD change per layer group and rung (opt-in, costly)
    scored: bool = True  # reads the profile's scores (uniform does not: the budget rung everywhere)
    external: bool = False  # its bit map is a serving engine's own rules applied to the model (llama.cpp's presets), not an allocation
    layerwise: bool = False  # moves whole layers from its `high` rung down to its `low` one (needs a rung above `low`)
    # The option naming whose quantization error prices the rungs (its default: the profile's own HQQ rungs);
    # on a backend whose own rung errors the profile measures (Capabilities.own_errors) the planner sets it to those.
    errors_option: str | None = None
    # (option, its values) that read the backward pass's loss estimate (optimal's objective "fisher"): with
    # no gradient windows the method would fall back to another objective under the same name.
    gradients: tuple[str, tuple[str, ...]] | None = None

    def reads_gradients(self, options: dict | None = None) -> bool:
        """Whether the method, with these options, needs the profile's backward pass."""
        return self.reads_rival_scores(options) or self._chosen(self.gradients, options)

    def reads_rival_scores(self, options: dict | None = None) -> bool:
        """Whether the method, with these options, needs the rival scores' columns in the profile."""
        return self.rival_scores or self._chosen(self.token_scores, options)

    def _chosen(self, switch: tuple[str, tuple[str, ...]] | None, options: dict | None) -> bool:
        if switch is None:
            return False
        option, values = switch
        return (options or {}).get(option, self.default(option)) in values

    @property
    def defaults(self) -> dict:
        """The pipeline's defaults that a variant records (the papers' settings)."""
        return {k: self.options[k]["default"] for k in self.named}

    def default(self, option: str):
        return self.options[option].get("default")

    def option_schemas(self) -> dict:
        """option -> the JSON schema its values must meet (without the default: a schema annotation)."""
        return {k: {key: v for key, v in s.items() if key != "default"} for k, s in {**self.options, **self.measured}.items()}

    def label(self, options: dict | None = None) -> str:
        """The method's name in tables, MLflow and plots: SB30 / KB21 for the boost methods
        (S/K B + boost_stop + top_m, as the papers write them), else the method's name."""
        if not self.boost:
            return self.name
        options = {**self.defaults, **(options or {})}
        return f"{self.name[0].upper()}B{options.get('boost_stop', '')}{options.get('top_m', '')}"


# a rung of the HQQ ladder (b4g64) or of the gguf ladder (a llama.cpp type: Q4_K, IQ4_XS, ...)
RUNG_NAME = {"type": "string", "pattern": r"^(b[2348]g(32|64|128)|[Qq][2-8]_([0-1]|[Kk])|[Ii][Qq][1-4]_([Nn][Ll]|[XxSsMm]+))$"}
_TIES = {"tie_fused": {"type": "boolean", "default": False}, "tie_experts": {"type": "boolean", "default": False}}


def _boost(boost_stop: int, top_m: int) -> dict:
    return {"boost_stop": {"type": "integer", "minimum": 0, "default": boost_stop}, "top_m": {"type": "integer", "minimum": 0, "default": top_m},
            "ablation": {"type": "boolean", "default": False}, "seed": {"type": "integer", "default": 0}, **_TIES}  # fmt: skip


# optimal's refine (tasks.allocation.refine.RefineSettings): true for its defaults, or an object of settings
REFINE_SCHEMA = {
    "type": ["boolean", "object"],
    "properties": {
        "generations": {"type": "integer", "minimum": 1},
        "seconds": {"type": "number", "exclusiveMinimum": 0},
        "offspring": {"type": "integer", "minimum": 1},
        "stages": {"type": "array", "items": {"type": "integer", "minimum": 1}, "minItems": 1},
        "survivors": {"type": "integer", "minimum": 1},
        "seed": {"type": "integer", "minimum": 0},
    },
    "additionalProperties": False,
}
# low/high None: the highest rung within the budget and the next bit width (tasks/allocation/layerwise.py)
_LAYERWISE = {"low": {**RUNG_NAME, "default": None}, "high": {**RUNG_NAME, "default": None}}
# rungs None: every rung of the ladder the variant's backend takes; "hqq" / "gguf": every rung of that ladder
_MILP = {"rungs": {"oneOf": [{"type": "string"}, {"type": "array", "items": RUNG_NAME, "minItems": 1}], "default": None},
         "time_limit": {"type": "number", "exclusiveMinimum": 0, "default": 60.0}, "mip_gap": {"type": "number", "minimum": 0, "default": 0.0},
         **_TIES}  # fmt: skip

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("uniform", "rung", scored=False, summary="every module at the budget rung"),
        MethodSpec("preset", "rung", scored=False, external=True, summary="llama.cpp's own mix for a preset (llama-quantize's rules; gguf backend)"),
        MethodSpec("sensiboost", "rung", boost=True, ties=True, options=_boost(3, 0), named=("boost_stop", "top_m"),
                   summary="boosts layers after jumps in activation sensitivity (SB30)"),
        MethodSpec("kurtboost", "rung", boost=True, ties=True, options=_boost(2, 1), named=("boost_stop", "top_m"),
                   summary="boosts layers after jumps in weight kurtosis (KB21)"),
        MethodSpec("lim", "exact", layerwise=True, options=_LAYERWISE, summary="least important layers (layer input modification) to the low rung"),
        MethodSpec("zd", "exact", layerwise=True, summary="least important layers (z-score distribution) to the low rung",
                   options={**_LAYERWISE, "zd_direction": {"enum": ["fewer-large-is-important", "more-large-is-important"],
                                                           "default": "fewer-large-is-important"}}),
        MethodSpec("mxq", "exact", ties=True, options={"tolerance": {"type": "number", "minimum": 0, "default": 0.0}, **_MILP},
                   summary="MILP minimizing the sum of Frobenius errors"),
        MethodSpec("optimal", "exact", ties=True, errors_option="errors", gradients=("objective", ("per_token", "fisher")),
                   token_scores=("objective", ("per_token",)), measured={"refine": {**REFINE_SCHEMA, "default": False}},
                   options={"objective": {"enum": ["per_token", "fisher", "sensitivity", "output"], "default": "per_token"},
                            "errors": {"enum": ["hqq", "gptq", "gguf"], "default": "hqq"}, **_MILP},
                   summary="MILP minimizing the per-token second-order estimate of the loss increase"),
        MethodSpec("taylor", "exact", ties=True, options=_MILP, rival_scores=True,
                   summary="NVIDIA ModelOpt auto_quantize's gradient score, same MILP"),
        MethodSpec("delta_loss", "exact", ties=True, options=_MILP, rival_scores=True,
                   summary="Intel AutoRound AutoScheme's |dL/dW * dW| score, same MILP"),
        MethodSpec("dkld_greedy", "exact", dkld=True,
                   summary="ExLlamaV3: measured KLD change per layer group and rung, spent greedily per extra bit"),
    )
}
BOOST_METHODS = tuple(n for n, s in METHODS.items() if s.boost)


def method_spec(name: str) -> MethodSpec:
    from tasks.errors import PipelineError

    if name not in METHODS:
        raise PipelineError(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def check_options(method: str, options: dict, param: str | None = None) -> None:
    """The one check of a method's options: names and values against the method's option schemas.
    `param`: the pipeline Param they came from, which the one-line errors then name."""
    import jsonschema

    from tasks.errors import PipelineError

    schemas = method_spec(method).option_schemas()
    unknown = sorted(set(options) - set(schemas))
    if unknown:
        head = f"Param {param}: " if param else ""
        raise PipelineError(f"{head}{method} does not take {', '.join(unknown)} (it takes: {', '.join(schemas) or 'none'})")
    for name, value in options.items():
        try:
            jsonschema.validate(value, schemas[name])
        except jsonschema.ValidationError as exc:
            where = f"Param {param}[{method!r}][{name!r}]" if param else f"{method} option {name}"
            raise PipelineError(f"{where}: {exc.message}") from None


def takes_options(method: str):
    """Decorator of an allocator(scores, budget, *options) (or a helper whose last parameters are the
    options): they are the method's options, in any order, and take their defaults from the option schemas
    above, so that the defaults live in one place."""

    def apply(function):
        spec = method_spec(method)
        code = function.__code__
        names = code.co_varnames[code.co_argcount - len(spec.options) : code.co_argcount] if spec.options else ()
        assert set(names) == set(spec.options) and not function.__defaults__, (function.__name__, names, tuple(spec.options))
        function.__defaults__ = tuple(spec.default(n) for n in names) or None
        return function

    return apply
