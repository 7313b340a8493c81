"""Scores that need only the weights (docs/methods.md §3 and §5): kurtosis and ZD.

Pure functions over CPU tensors; moments in float64 so that million-element matrices keep their digits.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch


def kurtosis(weight: torch.Tensor) -> float:
    """Pearson kurtosis m4 / m2**2 of all elements (KurtBoost; normal = 3).

    Equals scipy.stats.kurtosis(w, fisher=False, bias=True); NaN for a constant matrix, as scipy gives.
    """
    w = weight.detach().reshape(-1).double()
    centered = w - w.mean()
    sq = centered.square()
    m2 = sq.mean().item()
    m4 = sq.square().mean().item()
    return m4 / (m2 * m2) if m2 > 0 else math.nan


def zd_fraction(weights: Iterable[torch.Tensor]) -> float:
    """ZD of a decoder layer (Layer-Wise Quantization paper): the fraction of all its weights with
    z = (w - mean) / std > 1, mean and std (population) over the layer's weights pooled."""
    mats = [w.detach().reshape(-1) for w in weights]
    count = sum(m.numel() for m in mats)
    if count == 0:
        return math.nan
    mean = sum(m.double().sum().item() for m in mats) / count
    var = sum((m.double() - mean).square().sum().item() for m in mats) / count
    std = math.sqrt(var)
    if std == 0:
        return 0.0
    above = sum(int(((m.double() - mean) / std > 1.0).sum().item()) for m in mats)
    return above / count
