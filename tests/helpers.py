"""Small helpers the backend tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import torch

BOOSTED = ("0.self_attn.q_proj", "1.mlp.down_proj")  # the modules `boosted_bitmap` gives 8 bits


def boosted_bitmap(params: dict):
    """A KurtBoost-shaped map: b4g64 everywhere, BOOSTED at b8g128."""
    from tasks.bitmap import uniform_bitmap
    from tasks.ladder import Rung

    bitmap = uniform_bitmap(params, Rung(4, 64))
    bitmap.method = "kurtboost"
    for key in BOOSTED:
        bitmap.modules[key] = Rung(8, 128)
    return bitmap


def rel_error(reference: torch.Tensor, logits: torch.Tensor) -> float:
    return ((reference - logits.float()).norm() / reference.norm()).item()
