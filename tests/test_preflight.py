"""Pre-flight: every Param has at least one bad value that stops the run with one line naming it, and bad
model files stop it without a traceback."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from dataclasses import fields

import pytest

from tasks.errors import PipelineError
from tasks.orchestration.config import PipelineConfig, param_specs
from tasks.orchestration.preflight import backend_notes, preflight

# Param -> (a config with a bad value of it, what the error says). Each class of issue 14: types, unknown
# names, method options (unknown, of another method, wrong type), protocols, promotion rule types,
# budget feasibility per method, files.
BAD = {
    "model": ({"model": "   "}, "no model"),
    "revision": ({"revision": 7}, "is not of type"),
    "backends": ({"backends": ["exllama"]}, "unknown backend"),
    "uniform_budgets": ({"uniform_budgets": ["b5g64"]}, "b5g64"),
    "methods": ({"methods": ["magic"]}, "unknown method"),
    "gguf_presets": ({"gguf_presets": ["Q4_K_X"]}, "is not one of"),
    "preset_methods": ({"preset_methods": ["sensiboost"]}, "is not one of"),
    "budgets": ({"methods": ["optimal"], "budgets": ["1.9"]}, "optimal cannot meet '1.9'"),
    "method_options": ({"methods": ["mxq"], "method_options": {"mxq": {"tolerance": "tight"}}}, "is not of type 'number'"),
    "backend_options": ({"backends": ["gptq"], "backend_options": {"gptq": {"sym": "yes"}}}, "is not of type 'boolean'"),
    "match_boost_memory": ({"match_boost_memory": "yes"}, "is not of type 'boolean'"),
    "include_baseline": ({"include_baseline": 1}, "is not of type 'boolean'"),
    "calibration_samples": ({"calibration_samples": 0}, "calibration_samples"),
    "calibration_text": ({"calibration_text": "/nonexistent/calib.txt"}, "/nonexistent/calib.txt"),
    "wikitext2_text": ({"wikitext2_text": "/nonexistent/wiki.txt"}, "/nonexistent/wiki.txt"),
    "c4_parquet": ({"c4_parquet": "/nonexistent/c4.parquet"}, "/nonexistent/c4.parquet"),
    "calibration_seq_len": ({"calibration_seq_len": 8}, "less than the minimum"),
    "fisher_samples": ({"fisher_samples": -1}, "Param fisher_samples"),
    "eval_tokens": ({"eval_tokens": 1000, "protocols": ["gptq"]}, "too few for one gptq window"),
    "protocols": ({"protocols": ["lambada"]}, "unknown perplexity protocol"),
    "lm_eval_tasks": ({"lm_eval_tasks": ["no_such_task_anywhere"]}, "unknown lm-eval task"),
    "lm_eval_limit": ({"lm_eval_limit": 0}, "less than the minimum"),
    "promote_metric": ({"promote_metric": "ppl_wikitext2"}, "is not one of ['kld_wikitext2'"),
    "promote_tolerance": ({"promote_tolerance": -0.1}, "is less than the minimum of 0"),
    "promote_max_bytes": ({"promote_max_bytes": "a lot"}, "is not of type 'null', 'integer'"),
    "promote_min_improvement_pct": ({"promote_min_improvement_pct": "1%"}, "is not of type 'number'"),
    "seed": ({"seed": 4.5}, "seed"),
}

MORE_BAD = [  # further classes: option of a method that is not selected, unknown option, wrong rung type
    ({"methods": ["optimal"], "method_options": {"mxq": {"tolerance": 0}}}, "not among the selected methods"),
    ({"methods": ["optimal"], "method_options": {"optimal": {"objectiv": "fisher"}}}, "optimal does not take objectiv"),
    ({"methods": ["optimal"], "method_options": {"optimal": {"objective": "entropy"}}}, "is not one of"),
    ({"methods": ["optimal"], "method_options": {"optimal": {"rungs": ["b4g64"]}}, "budgets": ["3.3"]}, "cheapest allocation, every module at b4g64"),
    ({"methods": ["lim"], "budgets": ["8.3"]}, "no rung above it"),
    ({"methods": ["sensiboost"], "budgets": ["3.4"]}, "needs a ladder rung"),
    ({"protocols": ["paper", "paper"]}, "non-unique"),
    ({"promote_max_bytes": True}, "is not of type"),
    ({"backend_options": {"gptq": {"damp_percent": 0.01}}}, "not among the selected backends"),
    ({"uniform_budgets": ["b4g64", "4.25"]}, "Param uniform_budgets: 'b4g64' and '4.25' are the same"),
    ({"budgets": ["b3g64", "b3g64"]}, "Param budgets: 'b3g64' is given twice"),
    ({"backends": ["hqq", "hqq"]}, "Param backends: 'hqq' is given twice"),
    ({"methods": ["optimal"], "fisher_samples": 0}, "Param fisher_samples: optimal read"),
    ({"eval_tokens": 100}, "Param eval_tokens: 100 is too few for one paper window"),
    ({"backends": ["bnb"], "backend_options": {"bnb": {"quant_typ": "fp4"}}}, "Additional properties are not allowed"),
    ({"backends": ["bnb"], "backend_options": {"bnb": {"quant_type": "int3"}}}, "is not one of"),
]


def test_every_param_has_a_rejected_bad_value():
    assert set(BAD) == {f.name for f in fields(PipelineConfig)}, "a new Param needs its bad value here"


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_bad_param_is_one_line_naming_it(name, state):
    config, message = BAD[name]
    with pytest.raises(PipelineError) as err:
        preflight(config, state / "cache")
    text = str(err.value)
    assert message in text and "\n" not in text
    assert name in text or message.startswith("/nonexistent"), f"the error names the Param: {text}"


@pytest.mark.parametrize("config,message", MORE_BAD)
def test_more_bad_combinations(config, message):
    with pytest.raises(PipelineError, match=message):
        PipelineConfig.from_dict(config)


def test_the_dag_form_rejects_what_its_schema_can_express():
    import jsonschema

    specs = param_specs()
    for name, (config, _) in BAD.items():
        schema = {k: v for k, v in specs[name].items() if k not in ("default", "title", "description")}
        try:
            jsonschema.validate(config[name], schema)
        except jsonschema.ValidationError:
            continue
        # what a schema cannot say (files, combinations of Params) is the prepare step's pre-flight
        assert name in {"model", "budgets", "calibration_text", "wikitext2_text", "c4_parquet", "fisher_samples", "eval_tokens", "lm_eval_tasks"}, name


def test_method_option_schemas_match_the_allocators():
    from tasks.allocation.methods import METHODS
    from tasks.allocation.registry import method_options

    for name, spec in METHODS.items():
        assert set(spec.options) == set(method_options(name)), name


def test_skipped_backend_pairs_are_named_up_front():
    notes = backend_notes(PipelineConfig.from_dict({"backends": ["hqq", "bnb"], "uniform_budgets": ["b4g64", "b3g64"]}))
    assert any(n.startswith("bnb will skip uniform b3g64") for n in notes)
    assert not any(n.startswith("bnb will skip uniform b4g64") for n in notes) and not any(n.startswith("hqq") for n in notes)


def test_the_extra_cost_of_gptq_priced_rungs_is_announced_and_skipped_where_gptq_refuses_the_family():
    config = PipelineConfig.from_dict({"backends": ["hqq", "gptq"], "methods": ["optimal"]})
    assert any(n.startswith("gptq: the profile also prices every rung by GPTQ's own error") for n in backend_notes(config, "llama"))
    assert not any("prices" in n for n in backend_notes(config, "phi3")), "gptq refuses phi3: no GPTQ solves"
    off = PipelineConfig.from_dict({"backends": ["gptq"], "methods": ["optimal"], "method_options": {"optimal": {"errors": "hqq"}}})
    assert not any("prices" in n for n in backend_notes(off, "llama"))


# ---- the planned variants (--check) -----------------------------------------------------------------


def _checkpoint(tmp_path, tiny_model_dir):
    """A llama checkpoint of one tensor with the tiny model's tokenizer (no lm-eval, no model download)."""
    import shutil

    d = _safetensors_dir(tmp_path, "ckpt", _safetensors_bytes())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, d / name)
    return d


def _check(config: dict, capsys) -> list[str]:
    """The stdout lines of `python -m tasks pipeline --check --config <config>`, in this process."""
    import argparse

    from tasks.orchestration.cli import configure_pipeline, run_pipeline

    parser = argparse.ArgumentParser()
    configure_pipeline(parser)
    assert run_pipeline(parser.parse_args(["--check", "--config", json.dumps(config)])) == 0
    return capsys.readouterr().out.splitlines()


def test_check_lists_the_variants_the_run_would_name(tmp_path, state, capsys, tiny_model_dir):
    model = _checkpoint(tmp_path, tiny_model_dir)
    out = _check({"model": str(model), "lm_eval_tasks": [], "backends": ["hqq", "bnb"], "uniform_budgets": ["b4g64", "b3g64"],
                  "methods": ["sensiboost", "optimal"]}, capsys)  # fmt: skip
    ok = next(i for i, line in enumerate(out) if line.startswith("ok: ckpt"))
    rows = [line.split() for line in out[ok + 1 :]]
    assert all(r[0] == "variant:" for r in rows), out
    assert [r[1] for r in rows] == ["none/unquantized/fp32", "hqq/uniform/4.25", "bnb/uniform/4.25", "hqq/uniform/3.25", "bnb/uniform/3.25",
                                    "hqq/SB30/3.25", "bnb/SB30/3.25", "hqq/optimal/3.25@SB30", "bnb/optimal/3.25@SB30"]  # fmt: skip
    lines = {r[1]: line for r, line in zip(rows, out[ok + 1 :])}
    assert " method optimal " in lines["hqq/optimal/3.25@SB30"] and "budget b3g64 at SB30's memory" in lines["hqq/optimal/3.25@SB30"]
    assert lines["hqq/optimal/3.25@SB30"].endswith("backend hqq")
    assert "budget b3g64 (3.25 bpp)" in lines["hqq/SB30/3.25"] and " method sensiboost " in lines["hqq/SB30/3.25"]
    assert "(skipped: bnb cannot express rungs ['b3g64']" in lines["bnb/uniform/3.25"] and "skipped" not in lines["bnb/uniform/4.25"]
    assert any(line.startswith("note: bnb will skip uniform b3g64: bnb cannot express") for line in out[:ok]), "the backend notes come first"


def test_check_says_when_the_methods_have_no_budget(tmp_path, state, capsys, tiny_model_dir):
    model = _checkpoint(tmp_path, tiny_model_dir)
    out = _check({"model": str(model), "lm_eval_tasks": [], "budgets": [], "methods": ["mxq", "optimal"]}, capsys)
    assert out[-1] == "note: budgets is empty: mxq, optimal make no variant; only the uniform rungs run"
    assert not any("mxq" in line for line in out if line.startswith("variant:"))


def test_check_says_when_only_the_baseline_runs(tmp_path, state, capsys, tiny_model_dir):
    model = _checkpoint(tmp_path, tiny_model_dir)
    out = _check({"model": str(model), "lm_eval_tasks": [], "budgets": [], "uniform_budgets": [], "gguf_presets": []}, capsys)
    assert out[-2:] == ["variant: none/unquantized/fp32  method unquantized  budget fp32  backend none",
                        "note: uniform_budgets is empty and budgets is empty: only the baseline runs"]  # fmt: skip
    from tasks.orchestration.preflight import plan_lines

    skipped = plan_lines(PipelineConfig.from_dict({"backends": ["bnb"], "uniform_budgets": ["b3g64"], "methods": []}))
    assert skipped[-1] == "note: every (backend, variant) pair is skipped: only the baseline runs"
    nothing = plan_lines(PipelineConfig.from_dict({"uniform_budgets": [], "methods": ["uniform"], "include_baseline": False, "gguf_presets": []}))
    assert nothing == ["note: uniform_budgets is empty and no layer-sensitive method is selected: nothing runs"]
    default = plan_lines(PipelineConfig.from_dict({"backends": ["hqq"], "methods": ["kurtboost", "optimal"], "match_boost_memory": False}))
    assert [line.split()[1] for line in default][-2:] == ["hqq/KB21/3.25", "hqq/optimal/3.25"], "no matching: the plain name"


# ---- model files ------------------------------------------------------------------------------------


def _safetensors_dir(tmp_path, name, payload: bytes):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (d / "model.safetensors").write_bytes(payload)
    return d


def _safetensors_bytes(data_len=16, declared_end=16):
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, declared_end]}}).encode()
    return struct.pack("<Q", len(header)) + header + b"\0" * data_len


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"\x01\x02", "shorter than its header length"),
        (struct.pack("<Q", 10**9) + b"{}", "header length"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
        (_safetensors_bytes(data_len=8), "truncated: its tensors need 16 bytes of data, the file holds 8"),
    ],
)
def test_damaged_safetensors_are_refused(tmp_path, payload, message, state):
    d = _safetensors_dir(tmp_path, "ckpt", payload)
    with pytest.raises(PipelineError, match=message):
        preflight({"model": str(d)}, state / "cache")


def test_damaged_gguf_files_are_refused(tmp_path, embedded_model, state):
    from tasks.model_files import check_gguf
    from tasks.model_io import _embedded_gguf

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip file")
    with pytest.raises(PipelineError, match="not a GGUF file"):
        preflight({"model": str(not_gguf)}, state / "cache")
    good = _embedded_gguf().read_bytes()
    future = tmp_path / "future.gguf"
    future.write_bytes(good[:4] + struct.pack("<I", 9) + good[8:4096])
    with pytest.raises(PipelineError, match="GGUF version 9 is not supported"):
        check_gguf(future, full=False)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(PipelineError, match="truncated|damaged"):
        preflight({"model": str(truncated)}, state / "cache")
    cut_in_header = tmp_path / "cut-in-header.gguf"
    cut_in_header.write_bytes(good[:12])
    with pytest.raises(PipelineError, match="truncated GGUF file \\(12 bytes, shorter than the GGUF header\\)"):
        check_gguf(cut_in_header, full=False)
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(good[:2000])
    with pytest.raises(PipelineError, match="damaged or truncated GGUF"):
        check_gguf(header_only)


def test_the_cli_check_prints_one_error_line_and_no_traceback(tmp_path, state):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 5) + b"\0" * 10)
    for config in ({"model": str(truncated)}, {"promote_max_bytes": "a lot"}):
        out = subprocess.run([sys.executable, "-m", "tasks", "pipeline", "--check", "--config", json.dumps(config)],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in out.stderr, out.stderr


# ---- relations between Params, and the texts' content (each an error line naming the Param, or a note) --


def _short_model(tmp_path, tiny_model_dir, context: int):
    """The tiny checkpoint with a shorter context (max_position_embeddings)."""
    import shutil

    d = tmp_path / f"ctx{context}"
    shutil.copytree(tiny_model_dir, d)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    return d


def _parquet(path, column):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": column}), path)
    return str(path)


@pytest.mark.parametrize("case", ["calibration_short", "wikitext2_short", "c4_short", "not_utf8", "nul_bytes", "c4_ints", "config_not_json",
                                  "seq_len_beyond_context", "window_beyond_context"])  # fmt: skip
def test_relations_and_contents_end_in_one_line_naming_the_param(case, tmp_path, tiny_model_dir, state):
    text = tmp_path / "t.txt"
    config, param, message = {"model": str(tiny_model_dir), "calibration_seq_len": 64}, None, None
    if case == "calibration_short":
        text.write_text("A short text.")
        config["calibration_text"], param, message = str(text), "calibration_text", "fewer than one window of calibration_seq_len 64"
    elif case == "wikitext2_short":
        text.write_text("Ten words of WikiText, far fewer than a window holds.")
        config["wikitext2_text"], param, message = str(text), "wikitext2_text", "fewer than one paper window (1024)"
    elif case == "c4_short":
        config["c4_parquet"], param, message = _parquet(tmp_path / "c4.parquet", ["one tiny document"]), "c4_parquet", "fewer than one paper window"
    elif case == "not_utf8":
        text.write_bytes("caf\xe9 au lait, latin-1 encoded".encode("latin-1"))
        config["calibration_text"], param, message = str(text), "calibration_text", "not UTF-8 text"
    elif case == "nul_bytes":
        text.write_bytes(b"\x00" * 4096)
        config["wikitext2_text"], param, message = str(text), "wikitext2_text", "NUL bytes"
    elif case == "c4_ints":
        config["c4_parquet"], param, message = _parquet(tmp_path / "c4.parquet", [1, 2, 3]), "c4_parquet", "holds int64, not strings"
    elif case == "config_not_json":
        broken = _short_model(tmp_path, tiny_model_dir, 4096)
        (broken / "config.json").write_text("{model_type: llama")
        config["model"], param, message = str(broken), "model", "is not JSON"
    elif case == "seq_len_beyond_context":
        config.update(model=str(_short_model(tmp_path, tiny_model_dir, 128)), calibration_seq_len=256)
        param, message = "calibration_seq_len", "longer than the model's context (128)"
    else:
        config["model"], param, message = str(_short_model(tmp_path, tiny_model_dir, 512)), "protocols", "a paper window is 1024 tokens, longer"
    with pytest.raises(PipelineError) as err:
        preflight(config, state / "cache")
    assert f"Param {param}" in str(err.value) and message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_relations_that_change_nothing_fatal_are_notes(tmp_path, tiny_model_dir, state):
    config = {"model": str(tiny_model_dir), "calibration_seq_len": 64, "calibration_samples": 4, "fisher_samples": 8,
              "eval_tokens": 10**7, "methods": ["optimal"]}  # fmt: skip
    _, _, notes = preflight(config, state / "cache")
    assert any("fisher_samples 8 is more than calibration_samples 4" in n for n in notes), notes
    assert any("eval_tokens 10,000,000 is more than wikitext2's" in n and "the whole set is evaluated" in n for n in notes), notes
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i}" for i in range(400)))
    _, _, notes = preflight({**config, "calibration_text": str(text), "calibration_samples": 64}, state / "cache")
    assert any("the random windows overlap" in n for n in notes), notes
