"""The scores table in the authors' long format (one row per layer, module and rung), written atomically.

Columns: the SensiBoost/KurtBoost authors' `fnorm-<model>.csv` ones (layer, module, nbit1, gsize1,
nbit2, gsize2, fnorm, memmb, params, kurtosis, sensitivity), then ours: `lim` and `zd` (per decoder
layer, repeated on each row of the layer), `out_err` (per module and rung) and the layer's four raw
SensiBoost parts `sens_attn_in`, `sens_attn_out`, `sens_mlp_gate`, `sens_mlp_down` (repeated like lim),
and `fisher_dloss` (per module and rung: the Fisher estimate of the calibration loss increase, in nats per
token, when that module alone is quantized at that rung; empty when profiled without gradients), and the
rival allocators' `taylor_dloss` and `delta_loss` (tasks.profiling.rivals) and `dkld` (per layer group
and rung, repeated on the group's rows; tasks.profiling.dkld), and `out_err_gptq`, `fisher_dloss_gptq` and
`taylor_dloss_gptq` (the same scores for the error GPTQ leaves at each rung; tasks.profiling.gptq_errors),
each empty unless asked for.
`tasks.allocation.scores.read_scores` reads this file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd

from tasks.ladder import META_BITS, META_GROUP, Rung, ggml_rung

SCORES_FORMAT = 2  # bump when the columns change: cached scores tables of another format are not reused
SCORES_CSV = "scores.csv"
SUMMARY_FILE = "profiling.json"  # written last by run_profiling: an attempt that has it finished its scores
SCORES_PARQUET = "scores.parquet"
IMATRIX_FILE = "imatrix.gguf"  # llama.cpp's importance matrix of the calibration set, beside the scores (gguf rungs)
PARTS = ("attn_in", "attn_out", "mlp_gate", "mlp_down")
COLUMNS = (
    "layer", "module", "nbit1", "gsize1", "nbit2", "gsize2", "fnorm", "memmb", "params", "kurtosis",
    "sensitivity", "lim", "zd", "out_err", *(f"sens_{p}" for p in PARTS), "fisher_dloss", "taylor_dloss", "delta_loss",
    "dkld", "out_err_gptq", "fisher_dloss_gptq", "taylor_dloss_gptq", "type", "written",
)  # fmt: skip


def score_row(layer: int, module: str, rung: Rung, *, shape: tuple[int, int], fnorm: float, kurtosis: float,
              sensitivity: float, lim: float, zd: float, out_err: float, parts: dict[str, float]) -> dict:  # fmt: skip
    """One row; a gguf rung's row also names its type and the type llama-quantize writes for the module's
    row width (its errors and memory are that type's)."""
    params = shape[0] * shape[1]
    written = written_rung(rung, shape[1]) if rung.ggml else rung
    return {
        "layer": layer,
        "module": module,
        "nbit1": rung.bits,
        "gsize1": rung.group_size,
        "nbit2": META_BITS,
        "gsize2": META_GROUP,
        "fnorm": fnorm,
        "memmb": written.mib(params),
        "params": params,
        **({"type": rung.ggml, "written": written.ggml} if rung.ggml else {}),
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


def row_rung(row: dict) -> Rung:
    """The rung a row scores: its gguf type, else its (nbit1, gsize1) HQQ rung."""
    kind = row.get("type")
    return ggml_rung(kind) if isinstance(kind, str) and kind else Rung(int(row["nbit1"]), int(row["gsize1"]))


def written_rung(rung: Rung, row_width: int) -> Rung:
    from tasks.quantize.ggml_types import written_rung as written

    return written(rung, row_width)


def write_profile_imatrix(row_errors: dict, config, ids, path: Path) -> Path:
    """llama.cpp's imatrix file of the profiled modules (their `imatrix:` entries: tokens, then the sum of
    squares per input column), named as llama.cpp names the weights of `config`'s architecture."""
    import numpy as np

    from tasks.quantize.imatrix import ImportanceMatrix, gguf_weight_name, write_imatrix
    from tasks.quantize.llama_cpp import gguf_arch

    arch, layers = gguf_arch(config.model_type), int(config.num_hidden_layers)
    sums, counts = {}, {}
    for key, value in row_errors.items():
        if key.startswith("imatrix:"):
            layer, module = key.removeprefix("imatrix:").split(".", 1)
            name = gguf_weight_name(arch, f"model.layers.{layer}.{module}", layers)
            values = value.double().cpu().numpy()
            sums[name], counts[name] = values[None, 1:], np.array([[values[0]]])
    return write_imatrix(path, ImportanceMatrix(sums, counts, ("calibration",), int(ids.shape[0]), int(ids.shape[1])))
