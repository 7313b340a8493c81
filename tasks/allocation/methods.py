"""What the pipeline knows about each allocation method without running it: its budget kind, its default
options and its label. One table, read by the allocator registry, the variant planner, the DAG's Params
and the benchmarks; light on purpose (no numpy, no torch), so that planning runs in the Airflow image.

Budget kinds:
  rung   the budget must be a ladder rung; boost methods may exceed it (the extra memory is reported)
  exact  any real bits-per-parameter budget, never exceeded
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodSpec:
    name: str
    budget: str  # "rung" or "exact"
    defaults: dict = field(default_factory=dict)  # the pipeline's defaults (the papers' settings)
    boost: bool = False  # spends extra memory on outlier layers above the budget rung
    summary: str = ""
    ties: bool = False  # takes tie_fused (q/k/v and gate/up of a layer on one rung, for fused serving kernels)
    options: dict = field(default_factory=dict)  # option -> JSON schema of its value (the allocator's keyword arguments)
    rival_scores: bool = False  # needs a profile with the rival allocators' scores (an extra cost of the backward pass)
    dkld: bool = False  # needs a profile with ExLlamaV3's measured KLD change per layer group and rung (opt-in, costly)

    def label(self, options: dict | None = None) -> str:
        """The method's name in tables, MLflow and plots: SB30 / KB21 for the boost methods
        (S/K B + boost_stop + top_m, as the papers write them), else the method's name."""
        if not self.boost:
            return self.name
        options = {**self.defaults, **(options or {})}
        return f"{self.name[0].upper()}B{options.get('boost_stop', '')}{options.get('top_m', '')}"


RUNG_NAME = {"type": "string", "pattern": r"^b[2348]g(32|64|128)$"}
_BOOST = {"boost_stop": {"type": "integer", "minimum": 0}, "top_m": {"type": "integer", "minimum": 0},
          "ablation": {"type": "boolean"}, "seed": {"type": "integer"}, "tie_fused": {"type": "boolean"},
          "tie_experts": {"type": "boolean"}}  # fmt: skip
_LAYERWISE = {"low": RUNG_NAME, "high": RUNG_NAME}
_MILP = {"rungs": {"oneOf": [{"type": "string"}, {"type": "array", "items": RUNG_NAME, "minItems": 1}]},
         "time_limit": {"type": "number", "exclusiveMinimum": 0}, "mip_gap": {"type": "number", "minimum": 0},
         "tie_fused": {"type": "boolean"}, "tie_experts": {"type": "boolean"}}  # fmt: skip

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("uniform", "rung", summary="every module at the budget rung"),
        MethodSpec("sensiboost", "rung", {"boost_stop": 3, "top_m": 0}, boost=True, ties=True, options=_BOOST,
                   summary="boosts layers after jumps in activation sensitivity (SB30)"),
        MethodSpec("kurtboost", "rung", {"boost_stop": 2, "top_m": 1}, boost=True, ties=True, options=_BOOST,
                   summary="boosts layers after jumps in weight kurtosis (KB21)"),
        MethodSpec("lim", "exact", options=_LAYERWISE, summary="least important layers (layer input modification) to the low rung"),
        MethodSpec("zd", "exact", summary="least important layers (z-score distribution) to the low rung",
                   options={**_LAYERWISE, "zd_direction": {"enum": ["fewer-large-is-important", "more-large-is-important"]}}),
        MethodSpec("mxq", "exact", ties=True, options={"tolerance": {"type": "number", "minimum": 0}, **_MILP},
                   summary="MILP minimizing the sum of Frobenius errors"),
        MethodSpec("optimal", "exact", ties=True, options={"objective": {"enum": ["fisher", "sensitivity", "output"]},
                                                            "errors": {"enum": ["hqq", "gptq"]}, **_MILP},
                   summary="MILP minimizing the Fisher estimate of the loss increase"),
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
