"""The Pareto front of (cost, loss) points: the variants no other variant beats on both memory and quality."""

from __future__ import annotations

import numpy as np


def pareto_mask(cost, loss) -> np.ndarray:
    """True where no other point has cost <= and loss <= with at least one strictly smaller.

    Both objectives are minimized (bits per parameter, perplexity). Points with a NaN are never on the
    front. Exact duplicates are all kept (neither dominates the other).
    """
    cost = np.asarray(cost, dtype=float)
    loss = np.asarray(loss, dtype=float)
    if cost.shape != loss.shape:
        raise ValueError(f"cost and loss differ in shape: {cost.shape} vs {loss.shape}")
    valid = np.isfinite(cost) & np.isfinite(loss)
    mask = np.zeros(cost.shape, dtype=bool)
    # Sweep by cost, then loss: a point is on the front iff its loss is below every loss seen at a lower cost.
    order = np.lexsort((loss, cost))
    best = np.inf
    i = 0
    order = [k for k in order if valid[k]]
    while i < len(order):
        j = i
        while j < len(order) and cost[order[j]] == cost[order[i]]:
            j += 1
        group = order[i:j]  # same cost: only the lowest loss(es) can be on the front
        low = loss[group[0]]
        if low < best:
            for k in group:
                if loss[k] == low:
                    mask[k] = True
            best = low
        i = j
    return mask
