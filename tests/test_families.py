"""Architecture families through every stage, on tiny random-weight checkpoints saved the way a user's
arrives (a local safetensors directory): profile -> allocate (uniform, SensiBoost, optimal) -> quantize
(HQQ, GPTQ, AWQ, bitsandbytes: one pipeline per family) -> evaluate -> record; AWQ and bitsandbytes also
quantize a two-rung bit map of every family they claim and reload it. Families the pipeline cannot run
are refused at pre-flight with one line. The families table of docs/architectures.md is this file's matrix."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # one reduced pipeline per family

REPO = Path(__file__).resolve().parent.parent
COMMON = dict(vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
# family -> backends that refuse it (docs/architectures.md's families table)
REFUSED = {"gemma3_text": ("gptq",), "phi3": ("gptq", "awq", "bnb"), "qwen3_moe": ("gptq", "awq", "bnb"), "mixtral": ("gptq", "awq", "bnb")}
# One pipeline per family runs all four backends: those that claim it quantize, evaluate and record every
# variant they can express; those that refuse it give a pre-flight note and no variant.
BACKENDS = ("hqq", "gptq", "awq", "bnb")
# bnb expresses 4- and 8-bit at group 64 only: of the plan's variants, the uniform 4.25 one
EXPECTED = {"bnb": ("uniform/4.25",)}
CONF = {"backends": list(BACKENDS), "uniform_budgets": ["b4g64"], "methods": ["sensiboost", "optimal"], "budgets": ["b3g64"],
        "calibration_samples": 4, "calibration_seq_len": 128, "fisher_samples": 2, "eval_tokens": 1024,
        "protocols": ["paper"], "lm_eval_tasks": []}  # fmt: skip


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**COMMON, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2Config(**COMMON)
    if family == "qwen3":  # q/k norms, tied embeddings
        return tf.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=64)
    if family == "gemma2":
        return tf.Gemma2Config(**COMMON, head_dim=32, sliding_window=64, attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**COMMON, head_dim=32, sliding_window=64, layer_types=["sliding_attention", "full_attention"])
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**COMMON)
    if family == "qwen3_moe":  # a router and 4 experts per layer (stacked tensors in transformers 5)
        return tf.Qwen3MoeConfig(**COMMON, head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    if family == "mixtral":  # checkpoint names block_sparse_moe.experts.<e>.w1/w2/w3
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2)
    if family == "qwen2_moe":  # a shared expert beside the routed ones: not supported
        return tf.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
    raise ValueError(family)


def _checkpoint(root: Path, family: str, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    path = root / f"tiny-{family}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_config(family)).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, path / name)
    return path


def _pipeline(model: Path, home: Path, *extra: str) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, "QUANT_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    env.pop("QUANT_ARTIFACT_ROOT", None)
    conf = {**CONF, "model": str(model)}
    return subprocess.run([sys.executable, "-m", "tasks", "pipeline", *extra, "--config", json.dumps(conf)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "phi3", "qwen3_moe", "mixtral"])
def test_a_family_runs_every_stage_on_every_backend_or_is_refused_up_front(family, tmp_path, embedded_model):
    model = _checkpoint(tmp_path, family, embedded_model.path)
    check = _pipeline(model, tmp_path / "state", "--check")
    assert check.returncode == 0, check.stderr[-3000:]
    proc = _pipeline(model, tmp_path / "state")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "state" / "reports" / "latest" / "results.json").read_text())
    names = {r["variant"] for r in rows}
    for backend in BACKENDS:
        expected = {f"{backend}/{v}" for v in EXPECTED.get(backend, ("uniform/4.25", "SB30/3.25", "optimal/3.25@SB30"))}
        if backend in REFUSED.get(family, ()):  # refused up front: a pre-flight note, no variant, no traceback
            assert not {n for n in names if n.startswith(f"{backend}/")} and f"note: {backend} will skip every variant" in check.stdout, check.stdout
        else:
            assert expected <= names, (backend, names)
    for row in rows:
        assert math.isfinite(row["ppl_wikitext2"]) and row["ppl_wikitext2"] > 1, row
        if row["variant"] != "none/unquantized/fp32":
            assert row["version"], row


@pytest.mark.parametrize("family", ["qwen2_moe"])
def test_an_unsupported_family_is_refused_at_preflight_in_one_line(family, tmp_path, embedded_model):
    model = _checkpoint(tmp_path, family, embedded_model.path)
    proc = _pipeline(model, tmp_path / "state", "--check")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and family in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "mistral", "gemma2", "gemma3_text"])  # llama: test_backend_{awq,bnb}.py
@pytest.mark.parametrize("backend", ["awq", "bnb"])
def test_awq_and_bnb_quantize_a_bit_map_of_each_family_they_claim(backend, family, tmp_path, embedded_model):
    """b4g64 everywhere and two modules at b8g128 (bnb: nf4 and int8): quantized, saved, reloaded, and the
    reloaded model's logits close to the float model's but not equal to them."""
    import torch

    from helpers import boosted_bitmap, rel_error
    from tasks.model_io import linear_param_counts, load_model, read_config
    from tasks.quantize.registry import get_backend

    if backend == "awq":
        pytest.importorskip("llmcompressor", reason="llmcompressor is not installed (the llmcompressor container has it)")
    model = _checkpoint(tmp_path, family, embedded_model.path)
    ids = torch.randint(3, 4000, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = load_model(model)(ids).logits
    quantizer = get_backend(backend)
    out = tmp_path / backend
    out.mkdir()
    quantizer.quantize(model, boosted_bitmap(linear_param_counts(read_config(model))), ids, out, {"n_grid": 4} if backend == "awq" else {})
    with torch.no_grad():
        logits = quantizer.load(out)(ids).logits
    assert 1e-3 < rel_error(reference, logits) < 0.5
