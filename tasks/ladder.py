"""The configuration ladders of docs/methods.md §2 and the unit of allocation of section 1.

A rung of the HQQ ladder (the one every backend but gguf takes) is (b1 weight bits, g1 group size) with
HQQ's second-level quantization of scales and zeros at b2 = 8 bits, g2 = 128, so its nominal cost is
bpp = b1 + 2*b2/g1 + 32/(g1*g2). A rung of the gguf ladder is one of llama.cpp's quantization types
(Q4_K, IQ4_XS, ...; tasks/quantize/ggml_types.py), named by it and costing its exact bits per weight.
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
    bits: int  # weight bits (a ggml type's whole bits per weight: 4 for Q4_K)
    group_size: int  # weights per group (a ggml type's block)
    ggml: str = ""  # the llama.cpp type of a gguf rung ("Q4_K"), empty on the HQQ ladder

    @property
    def bpp(self) -> float:
        if self.ggml:
            return GGML_BPW[self.ggml]
        g1 = self.group_size
        return self.bits + 2 * META_BITS / g1 + 32 / (g1 * META_GROUP)

    @property
    def name(self) -> str:
        return self.ggml or f"b{self.bits}g{self.group_size}"

    @property
    def label(self) -> str:
        """The rounded bpp the papers name an HQQ rung by, e.g. '4.25'; a ggml type's name."""
        return self.ggml or f"{self.bpp:.2f}"

    @property
    def ladder(self) -> str:
        return "gguf" if self.ggml else "hqq"

    def mib(self, params: int) -> float:
        return self.bpp * params / 8 / 2**20

    def to_json(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, **({"type": self.ggml} if self.ggml else {})}

    @classmethod
    def from_json(cls, data: dict) -> "Rung":
        return ggml_rung(data["type"]) if data.get("type") else cls(int(data["bits"]), int(data["group_size"]))


# (block, bytes per block) of llama.cpp's types (ggml's type traits, as gguf-py's GGML_QUANT_SIZES mirrors
# them; tests/test_ggml_types.py checks both against the built libggml). Kept here so that the ladder
# needs no numpy.
GGML_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34), "Q2_K": (256, 84),
               "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ2_XXS": (256, 66),
               "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98), "IQ3_S": (256, 110), "IQ4_NL": (32, 18),
               "IQ4_XS": (256, 136), "IQ1_S": (256, 50), "IQ1_M": (256, 56), "F16": (1, 2), "BF16": (1, 2), "F32": (1, 4)}  # fmt: skip
GGML_BPW = {name: 8 * size / block for name, (block, size) in GGML_BLOCKS.items()}


def ggml_rung(name: str) -> Rung:
    """The gguf rung of llama.cpp's type `name` (case-insensitive: 'q4_k' is Q4_K)."""
    key = str(name).strip().upper()
    if key not in GGML_BLOCKS:
        raise PipelineError(f"'{name}' is not a llama.cpp type of the gguf ladder (one of: {', '.join(r.name for r in GGUF_LADDER)})")
    return Rung(int(GGML_BPW[key]), GGML_BLOCKS[key][0], key)


# The 12 rungs of the HQQ ladder, cheapest first (docs/methods.md §2 order).
LADDER: tuple[Rung, ...] = tuple(Rung(b, g) for b in (2, 3, 4, 8) for g in (128, 64, 32))
# The gguf ladder, cheapest first: llama.cpp's K-quants, legacy types and i-quants.
GGUF_LADDER: tuple[Rung, ...] = tuple(ggml_rung(t) for t in ("IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_XS", "Q4_0",
                                                             "IQ4_NL", "Q4_K", "Q4_1", "Q5_0", "Q5_K", "Q5_1", "Q6_K", "Q8_0"))  # fmt: skip
LADDERS = {"hqq": LADDER, "gguf": GGUF_LADDER}
# llama.cpp's quantization presets (llama-quantize's type argument): fixed per-tensor rules, a budget the
# gguf backend's exact methods can be given (their tensor-data size) and a variant of their own.
GGUF_PRESETS = ("Q2_K", "Q2_K_S", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K", "IQ2_M", "IQ3_XS", "IQ3_M")


@dataclass(frozen=True)
class Preset:
    """A llama.cpp preset as a budget: the size of the mix llama-quantize's own rules give (Q4_K_M)."""

    name: str
    ladder: str = "gguf"

    @property
    def label(self) -> str:
        return self.name


def parse_preset(text) -> Preset | None:
    """The preset `text` names ('q4_k_m'), or None. Q2_K and Q6_K name a preset and a type alike: as a
    budget they are the preset (its rules also pick the embeddings' and output head's types)."""
    key = str(text).strip().upper()
    return Preset(key) if key in GGUF_PRESETS else None
_BY_NAME = {r.name: r for r in LADDER}
_BY_LABEL = {r.label: r for r in LADDER}


def parse_rung(text: str | float) -> Rung:
    """A rung from its name ('b4g64', or a llama.cpp type such as 'Q4_K') or its rounded bpp ('4.25' or 4.25)."""
    key = str(text).strip().lower()
    if key in _BY_NAME:
        return _BY_NAME[key]
    if key.upper() in GGML_BLOCKS and key.upper() not in ("F16", "BF16", "F32"):
        return ggml_rung(key)
    try:
        label = f"{float(key):.2f}"
    except ValueError:
        label = None
    if label in _BY_LABEL:
        return _BY_LABEL[label]
    names = ", ".join(f"{r.name}={r.label}" for r in LADDER)
    raise PipelineError(f"'{text}' is not a rung of the ladder (HQQ's: {names}; the gguf backend's llama.cpp types: {', '.join(r.name for r in GGUF_LADDER)})")


def ladder_of(rung: Rung) -> tuple[Rung, ...]:
    return LADDERS[rung.ladder]


def rung_index(rung: Rung) -> int:
    return ladder_of(rung).index(rung)


def boost(rung: Rung, stops: int) -> Rung:
    """Move `stops` rungs up the rung's ladder, clamped at its top rung (b8g32, Q8_0)."""
    ladder = ladder_of(rung)
    return ladder[min(rung_index(rung) + stops, len(ladder) - 1)]


def module_key(layer: int, module: str) -> str:
    return f"{layer}.{module}"


def split_key(key: str) -> tuple[int, str]:
    layer, module = key.split(".", 1)
    return int(layer), module
