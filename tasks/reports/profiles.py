"""Per-layer score profiles from a scores table, and the outlier layers SensiBoost/KurtBoost would boost.

The scores table is the authors' long format (one row per layer x module x rung: layer, module, nbit1,
gsize1, kurtosis, sensitivity, ...) plus our profiler's per-layer lim and zd. Kurtosis and sensitivity
do not depend on the rung; the allocator reads them from the b4g64 rows (docs/methods.md §4), so do we.
The outlier rule is the allocator's own (tasks.allocation.boost.find_outliers), so the plot marks
exactly the layers the allocation boosts.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from tasks.errors import PipelineError

log = logging.getLogger(__name__)

PROFILE_RUNG = (4, 64)  # the rows whose scores the allocator reads
# score column -> (jump measure between consecutive layers, the method that uses it, its paper setting's
# top_m: SB30 boosts every outlier, KB21 only the most extreme one per module type)
OUTLIER_RULES = {"sensitivity": ("ratio", "SB30", 0), "kurtosis": ("difference", "KB21", 1)}


def profile_table(scores: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, module): the b4g64 rows when the table has rungs, else the first row of each."""
    missing = [c for c in ("layer", "module") if c not in scores.columns]
    if missing:
        raise PipelineError(f"scores table lacks column(s) {', '.join(missing)}")
    df = scores
    if {"nbit1", "gsize1"} <= set(df.columns):
        rows = df[(pd.to_numeric(df["nbit1"], errors="coerce") == PROFILE_RUNG[0])
                  & (pd.to_numeric(df["gsize1"], errors="coerce") == PROFILE_RUNG[1])]
        if not rows.empty:
            df = rows
    df = df.drop_duplicates(["layer", "module"]).copy()
    df["layer"] = pd.to_numeric(df["layer"], errors="coerce").astype("Int64")
    for col in ("kurtosis", "sensitivity", "lim", "zd"):
        if col in df.columns:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    return df.sort_values(["module", "layer"]).reset_index(drop=True)


def score_outliers(table: pd.DataFrame, top_m: int = 0) -> dict[str, dict[str, list[int]]]:
    """{score column: {module: outlier layers, most extreme first}} by docs/methods.md §4's z-score rule.

    top_m = 0 lists every layer with z > 3; a paper setting boosts the first top_m of each list.
    A module type whose series has gaps or NaN scores is skipped with a warning: the rule needs every layer.
    """
    from tasks.allocation.boost import find_outliers

    found: dict[str, dict[str, list[int]]] = {}
    for col, (measure, method, _) in OUTLIER_RULES.items():
        if col not in table.columns:
            continue
        found[col] = {}
        for module, series in table.groupby("module", sort=False):
            series = series.sort_values("layer")
            values = series[col].to_numpy(dtype=float)
            layers = series["layer"].to_numpy(dtype=float)
            if not np.isfinite(values).all() or list(layers) != list(range(len(layers))):
                log.warning("%s of %s has gaps or NaN: no %s outliers marked", col, module, method)
                continue
            try:
                found[col][str(module)] = find_outliers(values, measure, top_m)
            except PipelineError as exc:
                log.warning("no %s outliers for %s: %s", method, module, exc)
    return found
