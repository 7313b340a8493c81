import json
import struct
import subprocess
import sys

import pytest

from tasks.errors import PipelineError
from tasks.model_io import resolve_model


def test_local_checkpoint_revision_tracks_content(tiny_model_dir, state):
    a = resolve_model(str(tiny_model_dir))
    assert a.path == tiny_model_dir and a.revision.startswith("sha256:")
    assert resolve_model(str(tiny_model_dir)).revision == a.revision


def test_embedded_model_is_a_plain_safetensors_checkpoint(embedded_model):
    assert (embedded_model.path / "model.safetensors").exists()
    config = json.loads((embedded_model.path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3
    assert "quantization_config" not in config


@pytest.mark.parametrize(
    "source, message",
    [
        ("/nonexistent/checkpoint", "not a checkpoint directory"),
        ("nobody-here/no-such-model-xyz", "could not be fetched|not found"),
        ("plainword", "neither a local directory nor a hub id"),
        ("", "no model given"),
    ],
)
def test_bad_model_sources_are_one_line_errors(source, message, state):
    with pytest.raises(PipelineError, match=message):
        resolve_model(source)


def test_unsupported_architecture(tmp_path, state):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # a valid, empty safetensors file
    with pytest.raises(PipelineError, match="unsupported architecture 'bert'"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model": "nobody-here/no-such-model-xyz"}, "could not be fetched|not found"),
        ({"uniform_budgets": ["b5g64"]}, "not a rung of the ladder"),
        ({"methods": ["magic"]}, "unknown method"),
        ({"budgets": ["-3"]}, "outside the ladder"),
        ({"colour": "blue"}, "unknown pipeline option"),
        ({"wikitext2_text": "EMPTY"}, r"text file .*empty\.txt is empty"),
        ({"c4_parquet": "/no/such/c4.parquet"}, "Param c4_parquet: C4 parquet not found"),
        ({"c4_parquet": "README.md"}, "Param c4_parquet: C4 parquet README.md is not a parquet file"),
    ],
)
def test_cli_bad_input_gives_one_line_and_no_traceback(config, message, state, tmp_path):
    if config.get("wikitext2_text") == "EMPTY":
        (tmp_path / "empty.txt").write_text("\n  \n")
        config = {"wikitext2_text": str(tmp_path / "empty.txt")}
    proc = subprocess.run(
        [sys.executable, "-m", "tasks", "pipeline", "--check", "--config", json.dumps(config)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    import re

    assert re.search(message, lines[0]), lines[0]


def test_runs_that_start_together_on_a_fresh_cache_convert_a_gguf_once(tmp_path, monkeypatch, state):
    """Two resolutions of one GGUF at once: one converts (slowly), the other waits for its lock and reads
    the finished directory; neither sees a half-written or replaced one."""
    import threading
    import time

    from tasks import model_io

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    conversions, seen = [], []

    def convert(source, target):
        conversions.append(target)
        time.sleep(0.5)  # long enough for the other run to arrive while this one converts
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    def resolve():
        seen.append(model_io._resolve_gguf(gguf, tmp_path / "cache", "m", str(gguf)).path)
        assert (seen[-1] / "config.json").read_text() == "{}"

    monkeypatch.setattr(model_io, "check_gguf", lambda path, full=True: None)
    monkeypatch.setattr(model_io, "_convert_gguf", convert)
    monkeypatch.setattr(model_io, "write_vocab_gguf", lambda source, out: out.write_text("vocab"))
    monkeypatch.setattr(model_io, "check_tokenizer", lambda source, target: None)
    monkeypatch.setattr(model_io, "_gguf_revision", lambda path: "sha256:0")
    monkeypatch.setattr("tasks.gguf_tokenizer.is_spm", lambda path: False)
    runs = [threading.Thread(target=resolve) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert len(conversions) == 1 and len(seen) == 2 and seen[0] == seen[1]
