"""The scores table in the authors' long format (one row per layer, module and rung), written atomically.

Columns: the SensiBoost/KurtBoost authors' `fnorm-<model>.csv` ones (layer, module, nbit1, gsize1,
nbit2, gsize2, fnorm, memmb, params, kurtosis, sensitivity), then ours: `lim` and `zd` (per decoder
layer, repeated on each row of the layer), `out_err` (per module and rung) and the layer's four raw
SensiBoost parts `sens_attn_in`, `sens_attn_out`, `sens_mlp_gate`, `sens_mlp_down` (repeated like lim),
and `fisher_dloss` (per module and rung: the Fisher estimate of the calibration loss increase, in nats per
token, when that module alone is quantized at that rung; empty when profiled without gradients), and the
rival allocators' `taylor_dloss` and `delta_loss` (tasks.profiling.rivals) and `dkld` (per layer group
and rung, repeated on the group's rows; tasks.profiling.dkld), and `out_err_gptq` and `fisher_dloss_gptq`
(the same two scores for the error GPTQ leaves at each rung; tasks.profiling.gptq_errors), each empty
unless asked for.
`tasks.allocation.scores.read_scores` reads this file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from tasks.ladder import META_BITS, META_GROUP, Rung

SCORES_FORMAT = 2  # bump when the columns change: cached scores tables of another format are not reused
SCORES_CSV = "scores.csv"
SUMMARY_FILE = "profiling.json"  # written last by run_profiling: an attempt that has it finished its scores
SCORES_PARQUET = "scores.parquet"
PARTS = ("attn_in", "attn_out", "mlp_gate", "mlp_down")
COLUMNS = (
    "layer", "module", "nbit1", "gsize1", "nbit2", "gsize2", "fnorm", "memmb", "params", "kurtosis",
    "sensitivity", "lim", "zd", "out_err", *(f"sens_{p}" for p in PARTS), "fisher_dloss", "taylor_dloss", "delta_loss",
    "dkld", "out_err_gptq", "fisher_dloss_gptq",
)  # fmt: skip


def score_row(layer: int, module: str, rung: Rung, *, params: int, fnorm: float, kurtosis: float,
              sensitivity: float, lim: float, zd: float, out_err: float, parts: dict[str, float]) -> dict:  # fmt: skip
    return {
        "layer": layer,
        "module": module,
        "nbit1": rung.bits,
        "gsize1": rung.group_size,
        "nbit2": META_BITS,
        "gsize2": META_GROUP,
        "fnorm": fnorm,
        "memmb": rung.mib(params),
        "params": params,
        "kurtosis": kurtosis,
        "sensitivity": sensitivity,
        "lim": lim,
        "zd": zd,
        "out_err": out_err,
        **{f"sens_{p}": parts[p] for p in PARTS},
    }


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_scores(rows: list[dict], out_dir: str | Path, parquet: bool = True) -> Path:
    """scores.csv (and scores.parquet) in out_dir, each written to a temporary name and renamed."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
    if parquet:
        _atomic(out / SCORES_PARQUET, lambda tmp: frame.to_parquet(tmp, index=False))
    csv = out / SCORES_CSV
    _atomic(csv, lambda tmp: frame.to_csv(tmp, index=False))
    return csv
