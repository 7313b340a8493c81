"""Standard errors of per-token averages, and whether two variants differ by more than noise.

Token losses are correlated over a few dozen tokens (one hard passage makes several hard tokens), so a
plain per-token standard error is too small. The tokens are cut, in stream order, into blocks of
BLOCK consecutive scored tokens (the last, shorter block joins the one before) and the mean's variance is
the cluster-robust (ratio-estimator) one over those blocks:

    se(mean)^2 = J / (J - 1) * sum_j (S_j - mean * n_j)^2 / N^2

with S_j and n_j the sum and count of block j and N the number of tokens. Perplexity's standard error
follows by the delta method: se(ppl) = ppl * se(mean NLL).

Two variants scored on the same tokens are compared by their paired per-token differences (same blocks):
a difference is within noise when |mean difference| < NOISE_Z * se(mean difference).
"""

from __future__ import annotations

import math

import numpy as np

BLOCK = 256
NOISE_Z = 2.0


def block_se(values: np.ndarray, block: int = BLOCK) -> float:
    """Standard error of the mean of `values` (stream order) with blocks of `block` tokens."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    blocks = max(1, n // block)
    if blocks < 2:
        return float("nan")  # one block says nothing about the spread
    edges = [j * block for j in range(blocks)] + [n]  # the remainder joins the last block
    sums = np.add.reduceat(values, edges[:-1])
    counts = np.diff(edges)
    mean = values.mean()
    return math.sqrt(blocks / (blocks - 1) * float(((sums - mean * counts) ** 2).sum())) / n


def ppl_with_se(nll: np.ndarray) -> tuple[float, float]:
    mean = float(np.mean(nll))
    ppl = math.exp(mean)
    return ppl, ppl * block_se(nll)


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a - b) and its standard error, for per-token values of two variants on the same tokens."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same tokens: {a.shape} vs {b.shape}")
    d = a - b
    return float(d.mean()), block_se(d)


def within_noise(a: np.ndarray, b: np.ndarray, z: float = NOISE_Z) -> bool:
    diff, se = paired_difference(a, b)
    return not (abs(diff) >= z * se) if math.isfinite(se) else True
