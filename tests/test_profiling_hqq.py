"""The profiler's HQQ quantize-dequantize is bit for bit the shared one (tasks.quantize.hqq_ops)."""

from __future__ import annotations

import pytest
import torch

from tasks.errors import PipelineError
from tasks.ladder import LADDER, Rung
from tasks.profiling import hqq_fast
from tasks.quantize.hqq_ops import quant_dequant


pytestmark = pytest.mark.usefixtures("one_thread")


def _weights(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    if kind == "normal":
        return torch.randn(96, 128, generator=gen) * 0.02
    if kind == "heavy":
        # Student-t-like tails and a wide range: at 2-3 bits many |W - W_r| exceed the shrinkage
        # threshold (about 0.17), which exercises the pow path on gathered elements.
        base = torch.randn(96, 128, generator=gen)
        scale = torch.randn(96, 128, generator=gen).abs().add_(0.05).reciprocal_().sqrt_()
        return base * scale * 0.3
    # a bfloat16 checkpoint weight, as real models ship
    return (torch.randn(64, 192, generator=gen) * 0.05).to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["normal", "heavy", "bf16"])
@pytest.mark.parametrize("rung", LADDER, ids=lambda r: r.name)
def test_bitwise_equal_to_hqq(kind, rung):
    w = _weights(kind)
    expected = quant_dequant(w.float(), rung)
    got = hqq_fast.quant_dequant(w, rung)
    assert got.dtype == torch.float32 and got.shape == w.shape
    assert torch.equal(got, expected), f"max diff {(got - expected).abs().max().item()}"


def test_heavy_weights_reach_the_shrinkage_path():
    w = _weights("heavy")
    # Half a 2-bit step over a group's range bounds |W - W_r|; it must exceed the threshold somewhere.
    groups = w.reshape(-1, 64)
    half_step = (groups.amax(1) - groups.amin(1)) / 6
    assert (half_step > hqq_fast._ZERO_SHRINK).any()


def test_group_must_divide_the_matrix():
    with pytest.raises(PipelineError, match="groups of 128"):
        hqq_fast.quant_dequant(torch.randn(3, 40), Rung(4, 128))
