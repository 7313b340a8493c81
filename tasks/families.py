"""How each architecture family stores the seven logical linears of a decoder layer (docs/methods.md §1).

Most families store one linear per logical module under its own name (`self_attn.q_proj`, ...). Phi-3
and Phi-4 store q, k and v as the rows of one `self_attn.qkv_proj` and gate and up as the rows of one
`mlp.gate_up_proj`, in that order (transformers' Phi3Attention and Phi3MLP slice them so). Everything
downstream keeps the logical keys, so a bit map reads the same for every family and the authors' CSV
format still round-trips: the profiler scores each logical module on its rows of the stored weight, the
allocators give the members of one stored linear one rung (`tie_fused`, which the planner turns on for
such families), and a backend quantizes the stored linear at that rung.

Mixture-of-experts families (Qwen3-MoE, Mixtral) replace the MLP by a router (`mlp.gate`, never quantized) and
`experts` small MLPs: their logical modules are the four attention linears and, per expert e,
`mlp.experts.<e>.gate_proj`, `.up_proj` and `.down_proj` (Qwen3-MoE's checkpoint names; tasks.experts maps
transformers' stacked expert tensors and Mixtral's `block_sparse_moe.experts.<e>.w1/w3/w2` onto them). Each expert is scored on the tokens the router sends it.

Light on purpose (no torch at import): pre-flight and the planner read it in the Airflow image.
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.errors import PipelineError
from tasks.ladder import MODULES

ATTN_IN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_GATE = ("mlp.gate_proj", "mlp.up_proj")

ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")

# Families with one stored linear per logical module.
SEPARATE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
# Families that store some logical modules stacked in one linear: stored name -> its members, in row order.
STACKED = {"phi3": {"self_attn.qkv_proj": ATTN_IN, "mlp.gate_up_proj": MLP_GATE}}
# Mixture-of-experts families: the config fields that may hold the number of experts per layer (the hub's
# config.json says num_experts; transformers 5 writes num_local_experts).
MOE = {"qwen3_moe": ("num_experts", "num_local_experts"), "mixtral": ("num_local_experts",)}
SUPPORTED_MODEL_TYPES = SEPARATE + tuple(STACKED) + tuple(MOE)


def expert_module(expert: int, projection: str) -> str:
    return f"mlp.experts.{expert}.{projection}"


def expert_of(module: str) -> int | None:
    """The expert index of a logical module ('mlp.experts.3.down_proj' -> 3), None for a dense one."""
    if not module.startswith("mlp.experts."):
        return None
    return int(module.split(".")[2])


def leaf(module: str) -> str:
    """The projection's own name ('mlp.experts.3.down_proj' -> 'down_proj', 'self_attn.q_proj' -> 'q_proj')."""
    return module.rpartition(".")[2]


@dataclass(frozen=True)
class Rows:
    """Where a logical module lives: rows [start, stop) of the stored linear `name` (relative to its layer)."""

    name: str
    start: int
    stop: int


class Layout:
    """The stored linears of one architecture's decoder layer and the logical modules in each."""

    def __init__(self, model_type: str, rows: dict[str, Rows], experts: int = 0):
        self.model_type = model_type
        self.rows = rows  # logical module -> Rows, in MODULES order (MoE: attention, then expert by expert)
        self.experts = experts  # experts per layer; 0 for a dense MLP
        self.linears: dict[str, tuple[str, ...]] = {}  # stored name -> its members, in row order
        for module, where in rows.items():
            self.linears[where.name] = self.linears.get(where.name, ()) + (module,)

    @property
    def modules(self) -> tuple[str, ...]:
        """The logical modules of one decoder layer, in the scores table's order."""
        return tuple(self.rows)

    def input_of(self, module: str) -> str:
        """Which captured input feeds the module: attention input, attention context, the MLP input and the
        down projection's input, per expert for MoE (q/k/v share one; gate/up share one)."""
        expert, name = expert_of(module), leaf(module)
        if name in ("q_proj", "k_proj", "v_proj"):
            return "attn"
        if name == "o_proj":
            return "ctx"
        kind = "act" if name == "down_proj" else "mlp"
        return kind if expert is None else f"{kind}.{expert}"

    @property
    def stacked(self) -> bool:
        """Whether some stored linear holds more than one logical module (its members must share a rung)."""
        return any(len(members) > 1 for members in self.linears.values())

    def stored_name(self, module: str) -> str:
        return self.rows[module].name

    def weights(self, state: dict) -> dict:
        """Logical module -> its weight [out, in] (a view of the stored tensor), from a layer's state dict."""
        return {m: state[f"{r.name}.weight"][r.start : r.stop] for m, r in self.rows.items()}

    def with_weights(self, state: dict, new: dict) -> dict:
        """`state` with the stored weights rebuilt from logical weights `new` (members not in `new` keep theirs)."""
        import torch

        out = dict(state)
        for name, members in self.linears.items():
            if any(m in new for m in members):
                old = self.weights(state)
                out[f"{name}.weight"] = torch.cat([new.get(m, old[m]) for m in members]) if len(members) > 1 else new[members[0]]
        return out

    def split_outputs(self, name: str, values):
        """Logical module -> its slice of a stored linear's last dimension (outputs, per-feature sums)."""
        return {m: values[..., self.rows[m].start : self.rows[m].stop] for m in self.linears[name]}

    def rung_of(self, name: str, layer: int, modules: dict) -> object:
        """The one rung a bit map gives the members of stored linear `name` in `layer` (error if they differ)."""
        members = self.linears[name]
        rungs = {modules[f"{layer}.{m}"] for m in members if f"{layer}.{m}" in modules}
        if len(rungs) > 1:
            raise PipelineError(
                f"{self.model_type} stores {', '.join(m.split('.')[-1] for m in members)} of layer {layer} as one "
                f"{name.split('.')[-1]}: the bit map gives them {len(rungs)} different rungs (allocate with tie_fused)"
            )
        return rungs.pop() if rungs else None


def model_type_of(config) -> str:
    """The model type of a transformers config or its config.json dict."""
    if isinstance(config, dict):
        return config.get("model_type") or config.get("text_config", {}).get("model_type") or ""
    return getattr(config, "model_type", "") or ""


def _get(config, key: str, default=None):
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def layout_for(config) -> Layout:
    """The layout of the config's family; a PipelineError names an unsupported one."""
    model_type = model_type_of(config)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise PipelineError(f"unsupported architecture {model_type!r}: supported are {', '.join(sorted(SUPPORTED_MODEL_TYPES))}")
    if model_type in MOE:
        return _moe_layout(config, model_type)
    if model_type not in STACKED:
        return Layout(model_type, {m: Rows(m, 0, None) for m in MODULES})
    hidden, heads = _get(config, "hidden_size"), _get(config, "num_attention_heads")
    head_dim = _get(config, "head_dim") or hidden // heads
    kv = _get(config, "num_key_value_heads") or heads
    widths = {"self_attn.q_proj": heads * head_dim, "self_attn.k_proj": kv * head_dim, "self_attn.v_proj": kv * head_dim,
              "mlp.gate_proj": _get(config, "intermediate_size"), "mlp.up_proj": _get(config, "intermediate_size")}  # fmt: skip
    rows = {}
    for name, members in STACKED[model_type].items():
        start = 0
        for m in members:
            rows[m] = Rows(name, start, start + widths[m])
            start += widths[m]
    rows = {m: rows.get(m, Rows(m, 0, None)) for m in MODULES}
    return Layout(model_type, rows)


def _moe_layout(config, model_type: str) -> Layout:
    # Qwen3-MoE can keep a dense MLP in some layers (mlp_only_layers, decoder_sparse_step); the released
    # models (Qwen3-30B-A3B, Qwen3-235B-A22B) use experts in every layer, which is all a layout describes.
    dense = list(_get(config, "mlp_only_layers", None) or [])
    step = _get(config, "decoder_sparse_step", 1) or 1
    if dense or step != 1:
        raise PipelineError(f"{model_type} with dense MLP layers (mlp_only_layers={dense}, decoder_sparse_step={step}) "
                            "is not supported: every decoder layer must be a mixture of experts")  # fmt: skip
    experts = next((int(n) for n in (_get(config, field) for field in MOE[model_type]) if n), 0)
    if experts < 1:
        raise PipelineError(f"{model_type} config gives no number of experts ({' or '.join(MOE[model_type])})")
    modules = ATTENTION + tuple(expert_module(e, p) for e in range(experts) for p in EXPERT_PROJECTIONS)
    return Layout(model_type, {m: Rows(m, 0, None) for m in modules}, experts=experts)
