"""The measured rows a long benchmark keeps in the repository (benchmarks/_rows.py) to continue elsewhere."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import numpy as np  # noqa: E402
import _rows  # noqa: E402

from tasks.bitmap import BitMap  # noqa: E402
from tasks.ladder import parse_rung  # noqa: E402

MODEL = SimpleNamespace(name="SmolLM2-135M-Instruct", revision="abc123")


def bitmap(rung: str) -> BitMap:
    modules = {"model.layers.0.mlp.down_proj": parse_rung(rung), "model.layers.0.self_attn.q_proj": parse_rung("b4g64")}
    return BitMap("optimal", modules, {k: 4096 for k in modules})


def test_a_row_comes_back_exactly_and_only_for_what_decided_it(tmp_path, monkeypatch):
    monkeypatch.setattr(_rows, "ROOT", tmp_path)
    who = _rows.identity(MODEL, "hqq", bitmap("b3g64"), eval_tokens=16384, samples=32)
    assert _rows.load("bench", who) is None
    kld = np.random.default_rng(0).gamma(0.5, 1.0, 16384).astype(np.float32)
    _rows.save("bench", who, {"kld_wikitext2": float(kld.mean()), "evaluation_dir": "/tmp/x", "name": "optimal 3.25", "ok": None},
               {"kld/wikitext2": kld})
    row = _rows.load("bench", who)
    assert row["kld_wikitext2"] == float(kld.mean()) and row["name"] == "optimal 3.25"
    assert "evaluation_dir" not in row and "ok" not in row  # machine-local paths are not kept
    assert row["tokens"]["kld/wikitext2"].dtype == np.float32 and np.array_equal(row["tokens"]["kld/wikitext2"], kld)
    # another map, other settings, another backend or a new ROWS_VERSION: not the same measurement
    for other in (_rows.identity(MODEL, "hqq", bitmap("b3g32"), eval_tokens=16384, samples=32),
                  _rows.identity(MODEL, "hqq", bitmap("b3g64"), eval_tokens=4096, samples=32),
                  _rows.identity(MODEL, "gptq", bitmap("b3g64"), eval_tokens=16384, samples=32)):
        assert _rows.load("bench", other) is None
    monkeypatch.setattr(_rows, "ROWS_VERSION", _rows.ROWS_VERSION + 1)
    assert _rows.load("bench", _rows.identity(MODEL, "hqq", bitmap("b3g64"), eval_tokens=16384, samples=32)) is None


def test_a_row_is_measured_once_then_read_from_the_store_unless_fresh(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    from tasks.evaluation.stage import TOKENS_FILE

    monkeypatch.setattr(_rows, "ROOT", tmp_path / "rows")
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    kld = np.linspace(0, 1, 64, dtype=np.float32)
    save_file({"kld/wikitext2": kld, "top1/wikitext2": np.ones(64, dtype=np.float32)}, str(evaluation / TOKENS_FILE))
    calls = []

    def measure():
        calls.append(1)
        return {"kld_wikitext2": float(kld.mean()), "evaluation_dir": str(evaluation)}, str(evaluation)

    who = _rows.identity(MODEL, "hqq", bitmap("b3g64"), eval_tokens=64)
    first = _rows.kept("bench", who, measure, ["kld/wikitext2", "nll/wikitext2"])
    again = _rows.kept("bench", who, measure, ["kld/wikitext2", "nll/wikitext2"])
    assert len(calls) == 1 and first["kld_wikitext2"] == again["kld_wikitext2"] == float(kld.mean())
    assert list(again["tokens"]) == ["kld/wikitext2"] and np.array_equal(again["tokens"]["kld/wikitext2"], kld)  # only what was asked, if there
    _rows.kept("bench", who, measure, ["kld/wikitext2"], fresh=True)
    assert len(calls) == 2
