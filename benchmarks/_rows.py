"""Measured rows kept in the repository, so that a benchmark longer than one sitting continues on another
machine: benchmarks/rows/<benchmark>/<key>.json, one file per measured variant, committed as it is made.

A row is a variant's metrics and the per-token values its paired comparisons read (float32, base64). Its
key hashes what decides the measurement: the model and its revision, the backend, the bit map module by
module, the evaluation's settings, and ROWS_VERSION, raised when a change of the pipeline changes measured
numbers (then every stored row is measured again). `--fresh-rows` on the benchmarks ignores stored rows.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Callable

import numpy as np

from tasks.artifacts import stable_hash, write_json_atomic

ROWS_VERSION = 1
ROOT = Path(__file__).resolve().parent / "rows"


def identity(model, backend: str, mix, **settings) -> dict:
    """What decides a row's numbers. `mix`: the bit map (its rungs module by module), None for the unquantized
    model, or any JSON-able description of the file (a gguf's every tensor type)."""
    modules = sorted((k, r.name) for k, r in mix.modules.items()) if hasattr(mix, "modules") else mix
    return {"version": ROWS_VERSION, "model": model.name, "revision": model.revision, "backend": backend, "modules": modules, **settings}


def _path(benchmark: str, who: dict) -> Path:
    return ROOT / benchmark / f"{stable_hash(who)}.json"


def load(benchmark: str, who: dict) -> dict | None:
    """The stored row's metrics with `tokens` (name -> per-token array), or None when not measured yet."""
    path = _path(benchmark, who)
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    tokens = {k: np.frombuffer(base64.b64decode(v), dtype="<f4").copy() for k, v in row.pop("tokens").items()}
    return {**row["metrics"], "tokens": tokens}


def kept(benchmark: str, who: dict, measure: Callable[[], tuple[dict, str]], keep, fresh: bool = False) -> dict:
    """The row of `who`: the stored one, or (none stored, or `fresh`) `measure()` -> (metrics, its evaluation
    output) stored with the per-token values named in `keep` and read back, so both paths give the same row."""
    row = None if fresh else load(benchmark, who)
    if row is None:
        from tasks.evaluation.stage import load_tokens

        metrics, evaluation = measure()
        tokens = load_tokens(evaluation)
        save(benchmark, who, metrics, {k: tokens[k] for k in keep if k in tokens})
        row = load(benchmark, who)
    return row


def save(benchmark: str, who: dict, metrics: dict, tokens: dict[str, np.ndarray]) -> None:
    """Store a measured row: its plain metrics (numbers and strings) and the per-token arrays named."""
    plain = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) and k != "evaluation_dir"}
    encoded = {k: base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() for k, v in tokens.items()}
    path = _path(benchmark, who)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"identity": who, "metrics": plain, "tokens": encoded})
