"""The configuration ladder of docs/methods.md §2 and the unit of allocation of section 1.

A rung is (b1 weight bits, g1 group size) with HQQ's second-level quantization of scales and zeros at
b2 = 8 bits, g2 = 128, so its nominal cost is  bpp = b1 + 2*b2/g1 + 32/(g1*g2).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.errors import PipelineError

META_BITS = 8  # b2
META_GROUP = 128  # g2

# The seven linears of a decoder layer, in the authors' order. Keys are "<layer>.<module>".
MODULES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

# The linears a serving engine (vLLM, TensorRT-LLM) fuses into one kernel, so they must share one
# precision there: the attention input projections and the MLP's gate and up projections (of each expert,
# in a mixture-of-experts layer: `mlp.experts.<e>.gate_proj` with `mlp.experts.<e>.up_proj`).
FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))
_FUSED_LEAVES = tuple(tuple(m.rpartition(".")[2] for m in group) for group in FUSED)


def fused_groups(keys, fused: bool = True, experts: bool = False) -> list[list[int]]:
    """Indices of `keys` ("<layer>.<module>") grouped as a serving engine fuses them (with `fused`); every
    other key alone. With `experts`, all expert linears of a layer form one group (a fused MoE kernel, such as vLLM's,
    runs every expert of a layer in one quantization format)."""
    keys = list(keys)
    group_of = {}
    for i, key in enumerate(keys):
        layer, module = split_key(key)
        parent, _, leaf = module.rpartition(".")
        if experts and module.startswith("mlp.experts."):
            group = (layer, "mlp.experts")
        else:
            fusable = fused and (parent in ("self_attn", "mlp") or module.startswith("mlp.experts."))
            members = next((g for g in _FUSED_LEAVES if leaf in g), None) if fusable else None
            group = (layer, parent, members) if members else (key,)
        group_of.setdefault(group, []).append(i)
    return list(group_of.values())


def module_order(module: str) -> tuple:
    """Sort key of a logical module: the seven of MODULES in the authors' order, then experts by number."""
    if module in MODULES:
        return (MODULES.index(module),)
    parts = module.split(".")
    projections = ("gate_proj", "up_proj", "down_proj")
    if module.startswith("mlp.experts.") and len(parts) == 4 and parts[2].isdigit() and parts[3] in projections:
        return (len(MODULES), int(parts[2]), projections.index(parts[3]))
    return (len(MODULES) + 1, module)


@dataclass(frozen=True)
class Rung:
    bits: int
    group_size: int

    @property
    def bpp(self) -> float:
        g1 = self.group_size
        return self.bits + 2 * META_BITS / g1 + 32 / (g1 * META_GROUP)

    @property
    def name(self) -> str:
        return f"b{self.bits}g{self.group_size}"

    @property
    def label(self) -> str:
        """The rounded bpp the papers name a rung by, e.g. '4.25'."""
        return f"{self.bpp:.2f}"

    def mib(self, params: int) -> float:
        return self.bpp * params / 8 / 2**20

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size}


# The 12 rungs, cheapest first (docs/methods.md §2 order).
LADDER: tuple[Rung, ...] = tuple(Rung(b, g) for b in (2, 3, 4, 8) for g in (128, 64, 32))
_BY_NAME = {r.name: r for r in LADDER}
_BY_LABEL = {r.label: r for r in LADDER}


def parse_rung(text: str | float) -> Rung:
    """A rung from its name ('b4g64') or its rounded bpp ('4.25' or 4.25)."""
    key = str(text).strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    try:
        label = f"{float(key):.2f}"
    except ValueError:
        label = None
    if label in _BY_LABEL:
        return _BY_LABEL[label]
    names = ", ".join(f"{r.name}={r.label}" for r in LADDER)
    raise PipelineError(f"'{text}' is not a rung of the ladder (one of: {names})")


def rung_index(rung: Rung) -> int:
    return LADDER.index(rung)


def boost(rung: Rung, stops: int) -> Rung:
    """Move `stops` rungs up the ladder, clamped at the top rung (b8g32)."""
    return LADDER[min(rung_index(rung) + stops, len(LADDER) - 1)]


def module_key(layer: int, module: str) -> str:
    return f"{layer}.{module}"


def split_key(key: str) -> tuple[int, str]:
    layer, module = key.split(".", 1)
    return int(layer), module
