"""AWQ backend (llm-compressor's AWQModifier + compressed-tensors) on a tiny Llama. Skips where
llmcompressor is not installed (the llmcompressor container has it)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import Rung
from helpers import boosted_bitmap, rel_error

pytest.importorskip("llmcompressor", reason="llmcompressor is not installed (the llmcompressor container has it)")

from tasks.quantize.awq import (  # noqa: E402
    AWQBackend,
    config_groups,
    effective_rungs,
    fitting_group_size,
)

FAST = {"n_grid": 4}  # AWQ's scale grid: 4 points instead of 20 keeps the test in seconds


@pytest.fixture(scope="module")
def tiny(word_llama):
    return word_llama


def test_group_sizes_that_do_not_divide_get_finer_groups():
    assert fitting_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert fitting_group_size(1536, 128) == 128
    assert fitting_group_size(576, 32) == 32
    bitmap = uniform_bitmap({"0.self_attn.q_proj": 1, "0.mlp.down_proj": 1}, Rung(4, 128))
    rungs, changes = effective_rungs(bitmap, {"0.self_attn.q_proj": 576, "0.mlp.down_proj": 1536})
    assert rungs == {"0.self_attn.q_proj": Rung(4, 64), "0.mlp.down_proj": Rung(4, 128)}
    assert changes == {"0.self_attn.q_proj": [128, 64]}
    with pytest.raises(PipelineError, match="576 input features"):
        effective_rungs(bitmap, {"0.self_attn.q_proj": 576, "0.mlp.down_proj": 1536}, "error")


def test_config_groups_target_every_module_exactly_once(tiny):
    bitmap = boosted_bitmap(tiny["params"])
    groups = config_groups(dict(bitmap.modules))
    assert {g["weights"]["num_bits"] for g in groups.values()} == {4, 8}
    for key, rung in bitmap.modules.items():
        name = f"model.layers.{key}"
        hits = [g for g in groups.values() if any(re.match(t[3:], name) for t in g["targets"])]
        assert len(hits) == 1 and hits[0]["weights"]["num_bits"] == rung.bits
        assert hits[0]["weights"]["group_size"] == rung.group_size


def test_awq_check_says_what_it_can(tiny):
    bitmap = boosted_bitmap(tiny["params"])
    AWQBackend().check(bitmap)
    bitmap.modules["1.mlp.up_proj"] = Rung(6, 64)
    with pytest.raises(PipelineError, match=r"awq cannot express rungs \['b6g64'\]"):
        AWQBackend().check(bitmap)
    with pytest.raises(PipelineError, match="calibration"):
        AWQBackend().quantize(tiny["path"], boosted_bitmap(tiny["params"]), None, tiny["path"] / "never", {})


def _packed_bits(handle, name, in_features):
    # pack-quantized: int32 columns = in_features * bits / 32
    return handle.get_slice(f"{name}.weight_packed").get_shape()[1] * 32 // in_features


def test_awq_uniform_4bit_roundtrip(tiny, tmp_path):
    from safetensors import safe_open

    backend = AWQBackend()
    bitmap = uniform_bitmap(tiny["params"], Rung(4, 64))
    facts = backend.quantize(tiny["path"], bitmap, tiny["calibration"], tmp_path, FAST)
    assert facts["quant_seconds"] > 0 and facts["saved_bytes"] > 0 and facts["group_size_changes"] == {}
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "bitmap.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert _packed_bits(fh, "model.layers.1.mlp.down_proj", 256) == 4
        assert fh.get_slice("model.layers.1.mlp.down_proj.weight_scale").get_shape() == [128, 256 // 64]
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    model = backend.load(tmp_path)
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert 1e-3 < rel_error(tiny["reference"], logits) < 0.5  # really quantized, still close
    assert backend.engine_checks(tmp_path)["vllm"].startswith("loads"), "4-bit groups of 64 over 256-wide inputs: vLLM's WNA16 takes it"


def test_awq_kurtboost_map_gives_boosted_modules_8_bits(tiny, tmp_path):
    from safetensors import safe_open

    backend = AWQBackend()
    facts = backend.quantize(tiny["path"], boosted_bitmap(tiny["params"]), tiny["calibration"], tmp_path, FAST)
    assert facts["config_groups"] == {"group_b4g64": 4, "group_b8g128": 8}
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"]) for g in saved.values()) == [(4, 64), (8, 128)]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert _packed_bits(fh, "model.layers.0.self_attn.q_proj", 128) == 8
        assert _packed_bits(fh, "model.layers.1.mlp.down_proj", 256) == 8
        assert _packed_bits(fh, "model.layers.1.self_attn.q_proj", 128) == 4
        assert fh.get_slice("model.layers.1.mlp.down_proj.weight_scale").get_shape() == [128, 256 // 128]
    model = backend.load(tmp_path)
    assert model.get_submodule("model.layers.0.self_attn.q_proj").quantization_scheme.weights.num_bits == 8
    assert model.get_submodule("model.layers.0.self_attn.k_proj").quantization_scheme.weights.num_bits == 4
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert 1e-3 < rel_error(tiny["reference"], logits) < 0.5
