"""llama.cpp's quantization types (ggml types), the rungs of the `gguf` backend: their exact storage from
llama.cpp's own type table (gguf-py's GGML_QUANT_SIZES, the Python mirror of ggml's type traits, checked
against the built libggml by tests/test_ggml_types.py), which of them llama-quantize refuses to write
without an importance matrix, and the type it writes instead for a tensor whose row width a type's block
cannot divide (llama-quant.cpp's `tensor_type_fallback`), so that a bit map records the type actually
written and its bits count what the file holds.

Light (numpy only, through gguf): the planner and the pre-flight read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tasks.errors import PipelineError
from tasks.ladder import GGUF_LADDER, Rung, ggml_rung

# The ladder of the gguf backend, cheapest first: the K-quants, the legacy types and the i-quants.
LADDER = tuple(r.name for r in GGUF_LADDER)
# llama-quant.cpp `tensor_requires_imatrix`: these refuse to quantize a weight (not the embeddings or the
# output head) without an importance matrix.
NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
# llama-quant.cpp `tensor_type_fallback`: the type written for a row width the target's block cannot divide.
FALLBACK = {**dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
            **dict.fromkeys(("Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"), "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}  # fmt: skip


@dataclass(frozen=True)
class GgmlType:
    name: str
    block: int  # weights per block (a row is a whole number of blocks)
    block_bytes: int  # bytes per block, scales included

    @property
    def bpw(self) -> float:
        """Bits per weight, exactly (Q4_K: 144 bytes per 256 weights = 4.5)."""
        return 8 * self.block_bytes / self.block

    @property
    def needs_imatrix(self) -> bool:
        return self.name in NEEDS_IMATRIX

    def fits(self, row_width: int) -> bool:
        return row_width % self.block == 0


def ggml_type(name: str) -> GgmlType:
    """The type called `name` (Q4_K, IQ4_XS, F16, ...), as llama.cpp sizes it."""
    try:
        kind = GGMLQuantizationType[name.upper()]
    except KeyError:
        raise PipelineError(f"unknown ggml type {name!r}: the gguf ladder is {', '.join(LADDER)}") from None
    block, block_bytes = GGML_QUANT_SIZES[kind]
    return GgmlType(kind.name, block, block_bytes)


def written_type(name: str, row_width: int) -> GgmlType:
    """What llama-quantize writes when asked for `name` on rows of `row_width` weights: the type itself
    when its block divides the row, else its fallback, else F16."""
    wanted = ggml_type(name)
    if wanted.fits(row_width):
        return wanted
    fallback = FALLBACK.get(wanted.name)
    if fallback is None and wanted.block > 32:
        raise PipelineError(f"llama.cpp defines no fallback for {wanted.name} on rows of {row_width}")
    chosen = ggml_type(fallback) if fallback else wanted
    return chosen if chosen.fits(row_width) else ggml_type("F16")


def tensor_bytes(name: str, rows: int, row_width: int) -> int:
    """The bytes a [rows, row_width] weight takes in the file at the type llama.cpp writes for `name`."""
    kind = written_type(name, row_width)
    return rows * row_width // kind.block * kind.block_bytes


def written_rung(rung: Rung, row_width: int) -> Rung:
    """The gguf rung llama-quantize actually writes for `rung` on rows of `row_width` weights."""
    return ggml_rung(written_type(rung.name, row_width).name)
