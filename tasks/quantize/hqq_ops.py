"""HQQ numerics shared by profiling and the HQQ backend, so both quantize a weight the same way.

hqq's own defaults (`BaseQuantizeConfig`): asymmetric, optimize=True (half-quadratic proximal solver),
axis=1 (groups run along flattened rows, which fits 576-wide SmolLM2 at g128), round_zero at 4 bits.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.ladder import Rung


def hqq_config(rung: Rung) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig

    return BaseQuantizeConfig(nbits=rung.bits, group_size=rung.group_size, axis=1)


def hqq_linear(linear: nn.Linear, rung: Rung, compute_dtype=torch.float32, device: str = "cpu") -> nn.Module:
    from hqq.core.quantize import HQQLinear

    return HQQLinear(linear, hqq_config(rung), compute_dtype=compute_dtype, device=device, del_orig=False)


@torch.no_grad()
def quant_dequant(weight: torch.Tensor, rung: Rung) -> torch.Tensor:
    """W -> dequant(HQQ_rung(W)) in the weight's dtype; the weight itself is not modified."""
    from hqq.core.quantize import HQQLinear

    layer = HQQLinear.from_weights(
        weight.detach().clone().float(), None, hqq_config(rung), compute_dtype=torch.float32, device="cpu"
    )
    return layer.dequantize().to(weight.dtype).reshape(weight.shape)
