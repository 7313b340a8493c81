"""The scores table: what the profiler measured, read once and handed to every allocator.

One format, a superset of the SensiBoost/KurtBoost authors' CSV (`fnorm-<model>.csv` of
schnell18/lm-quant-toolkit): one row per (layer, module, rung) with the columns
    layer, module, nbit1, gsize1, nbit2, gsize2, fnorm, memmb, params, kurtosis, cost_sensi, sensitivity
plus, from our profiler, `lim` and `zd` (per decoder layer, repeated on each of its rows) and `out_err`
(per module and rung: the mean squared error the rung causes in the module's output on calibration
activations). Per-module scores (kurtosis, sensitivity) are read from the b4g64 rows, as the authors'
`identify_sensitive_modules` does; in their files they are the same on all 12 rows of a module anyway.
Empty fields and "NA" read as missing: a column that is entirely missing (the authors' `cost_sensi`
for two of their three models; we never use it) counts as absent, and a method needing a column that
is absent or has gaps raises a one-line PipelineError naming it. An optional `model` column lets one
file hold several models; `--model` picks one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from tasks.errors import PipelineError
from tasks.ladder import GGUF_LADDER, LADDER, META_BITS, META_GROUP, Rung, module_key, module_order

log = logging.getLogger(__name__)

BASE_COLUMNS = ("layer", "module", "nbit1", "gsize1", "params")
REFERENCE_RUNG = Rung(4, 64)  # the rung whose rows carry the per-module scores (docs/methods.md §3)
_RUNG_BY_PAIR = {(r.bits, r.group_size): r for r in LADDER}
_GGUF_BY_NAME = {r.name: r for r in GGUF_LADDER}


@dataclass(frozen=True)
class Scores:
    """A validated scores table for one model.

    `frame` has one row per (module key, rung) with columns key, layer, module, rung (a rung name) and
    every data column of the input; `keys` lists the modules by layer, then in the order of MODULES (then
    experts by number).
    """

    frame: pd.DataFrame
    keys: tuple[str, ...]
    params: dict[str, int]
    rungs: tuple[Rung, ...]  # rungs present for every module, cheapest first
    source: str = "<frame>"
    model: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def layers(self) -> list[int]:
        return sorted({int(k.split(".", 1)[0]) for k in self.keys})

    @property
    def total_params(self) -> int:
        return sum(self.params.values())

    def has(self, column: str) -> bool:
        """True if the column exists and holds at least one value (the authors' `cost_sensi` is all NA)."""
        return column in self.frame.columns and bool(self.frame[column].notna().any())

    def require(self, columns: tuple[str, ...] | list[str], method: str) -> None:
        missing = [c for c in columns if not self.has(c)]
        if missing:
            raise PipelineError(
                f"scores table {self.source} lacks column(s) {', '.join(missing)} needed by method '{method}'"
            )

    def module_values(self, column: str) -> np.ndarray:
        """One value per module (in `keys` order) from the b4g64 rows, else the module's first row."""
        cache_key = ("module", column)
        if cache_key not in self._cache:
            rows = self.frame[self.frame["rung"] == REFERENCE_RUNG.name]
            if rows["key"].nunique() < len(self.keys):
                rows = self.frame.drop_duplicates("key")
            series = rows.set_index("key")[column].reindex(list(self.keys))
            self._cache[cache_key] = _no_na(series, column, self.source)
        return self._cache[cache_key]

    def layer_values(self, column: str) -> dict[int, float]:
        """One value per decoder layer: the first non-NA value among the layer's rows."""
        per_layer = self.frame.dropna(subset=[column]).groupby("layer")[column].first()
        missing = [layer for layer in self.layers if layer not in per_layer.index]
        if missing:
            raise PipelineError(f"column '{column}' of {self.source} has no value for layer(s) {missing}")
        return {int(layer): float(per_layer[layer]) for layer in self.layers}

    def ladder_rungs(self, ladder: str) -> tuple[Rung, ...]:
        """The table's rungs of one ladder ("hqq" or "gguf")."""
        return tuple(r for r in self.rungs if r.ladder == ladder)

    def written(self, rungs: tuple[Rung, ...]) -> list[list[Rung]]:
        """Per module and rung, the rung actually written: a gguf type's fallback where the module's row
        width does not take it (the `written` column), else the rung itself."""
        if not any(r.ggml for r in rungs) or not self.has("written"):
            return [list(rungs) for _ in self.keys]
        table = self.frame.pivot(index="key", columns="rung", values="written").reindex(index=list(self.keys), columns=[r.name for r in rungs])
        return [[_GGUF_BY_NAME[w] if isinstance(w, str) and w else r for r, w in zip(rungs, row)] for row in table.itertuples(index=False)]

    def realize(self, bitmap):
        """The bit map with every module at the rung actually written (see `written`)."""
        if not any(r.ggml for r in bitmap.modules.values()):
            return bitmap
        rungs = tuple(dict.fromkeys(bitmap.modules.values()))
        written = dict(zip(self.keys, self.written(rungs)))
        position = {r: j for j, r in enumerate(rungs)}
        modules = {k: written[k][position[r]] if k in written else r for k, r in bitmap.modules.items()}
        return replace(bitmap, modules=modules)

    def rung_matrix(self, column: str, rungs: tuple[Rung, ...] | None = None) -> np.ndarray:
        """Values of a per-(module, rung) column, shape (len(keys), len(rungs))."""
        rungs = tuple(rungs or self.rungs)
        absent = [r.name for r in rungs if r not in self.rungs]
        if absent:
            raise PipelineError(f"scores table {self.source} has no rows for rung(s) {', '.join(absent)}")
        table = self.frame.pivot(index="key", columns="rung", values=column)
        table = table.reindex(index=list(self.keys), columns=[r.name for r in rungs])
        values = table.to_numpy(dtype=float)
        if np.isnan(values).any():
            bad = table.stack(future_stack=True)
            first = bad[bad.isna()].index[0]
            raise PipelineError(
                f"column '{column}' of {self.source} has {int(np.isnan(values).sum())} NA value(s), e.g. {first[0]} at {first[1]}"
            )
        return values


def _no_na(series: pd.Series, column: str, source: str) -> np.ndarray:
    values = series.to_numpy(dtype=float)
    if np.isnan(values).any():
        first = series.index[np.isnan(values)][0]
        raise PipelineError(f"column '{column}' of {source} has {int(np.isnan(values).sum())} NA module(s), e.g. {first}")
    return values


def read_scores(path: str | Path, model: str | None = None) -> Scores:
    """Read a scores table (CSV in the authors' format or ours; Parquet also accepted)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"scores file not found: {path}")
    try:
        frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise PipelineError(f"cannot read scores table {path}: {str(exc).splitlines()[0]}") from None
    return scores_from_frame(frame, source=str(path), model=model)


def scores_from_frame(frame: pd.DataFrame, source: str = "<frame>", model: str | None = None) -> Scores:
    """Validate and normalize a raw table (see the module docstring)."""
    frame = _select_model(frame, source, model)
    missing = [c for c in BASE_COLUMNS if c not in frame.columns]
    if missing:
        raise PipelineError(f"scores table {source} lacks column(s) {', '.join(missing)}")
    if frame.empty:
        raise PipelineError(f"scores table {source} has no rows")
    if frame[list(BASE_COLUMNS)].isna().any().any():
        raise PipelineError(f"scores table {source} has NA in one of the columns {', '.join(BASE_COLUMNS)}")
    for col, expected in (("nbit2", META_BITS), ("gsize2", META_GROUP)):
        if col in frame.columns and not (frame[col].dropna() == expected).all():
            raise PipelineError(f"scores table {source}: {col} must be {expected} (the ladder's second level)")

    frame = frame.copy()
    frame["layer"] = frame["layer"].astype(int)
    frame["module"] = frame["module"].astype(str)
    types = frame["type"].where(frame["type"].notna(), "").astype(str) if "type" in frame.columns else pd.Series("", index=frame.index)
    pairs = list(zip(frame["nbit1"].astype(int), frame["gsize1"].astype(int)))
    unknown = sorted({p for p, t in zip(pairs, types) if not t and p not in _RUNG_BY_PAIR})
    if unknown:
        raise PipelineError(f"scores table {source} has configurations off the ladder: {unknown}")
    bad = sorted({t for t in types if t and t not in _GGUF_BY_NAME})
    if bad:
        raise PipelineError(f"scores table {source} has types off the gguf ladder: {bad}")
    frame["rung"] = [t or _RUNG_BY_PAIR[p].name for p, t in zip(pairs, types)]
    frame["key"] = [module_key(layer, mod) for layer, mod in zip(frame["layer"], frame["module"])]
    if frame.duplicated(["key", "rung"]).any():
        dup = frame[frame.duplicated(["key", "rung"])].iloc[0]
        raise PipelineError(f"scores table {source} repeats the row for {dup['key']} at {dup['rung']}")

    firsts = frame.drop_duplicates("key")
    keyed = sorted(zip(firsts["layer"], firsts["module"], firsts["key"]), key=lambda t: (t[0], module_order(t[1])))
    keys = tuple(k for _, _, k in keyed)

    params_per_key = frame.groupby("key")["params"].agg(["min", "max"])
    if (params_per_key["min"] != params_per_key["max"]).any():
        raise PipelineError(f"scores table {source} gives one module several parameter counts")
    params = {k: int(params_per_key.loc[k, "min"]) for k in keys}
    if min(params.values()) <= 0:
        raise PipelineError(f"scores table {source} has a module with no parameters")

    counts = frame.groupby("rung")["key"].nunique()
    rungs = tuple(r for r in LADDER + GGUF_LADDER if counts.get(r.name, 0) == len(keys))
    if not rungs:
        raise PipelineError(f"scores table {source}: no rung is present for every module")
    frame = frame.sort_values(["layer", "key", "rung"], kind="stable").reset_index(drop=True)
    log.debug("scores %s: %d modules, %d layers, rungs %s", source, len(keys), firsts["layer"].nunique(), [r.name for r in rungs])
    return Scores(frame=frame, keys=keys, params=params, rungs=rungs, source=source, model=model)


def _select_model(frame: pd.DataFrame, source: str, model: str | None) -> pd.DataFrame:
    if "model" not in frame.columns:
        return frame
    models = sorted(frame["model"].dropna().astype(str).unique())
    if model is None:
        if len(models) > 1:
            raise PipelineError(f"scores table {source} holds several models ({', '.join(models)}): pick one with --model")
        return frame
    if model not in models:
        raise PipelineError(f"model '{model}' is not in scores table {source} (it has: {', '.join(models)})")
    return frame[frame["model"].astype(str) == model]
