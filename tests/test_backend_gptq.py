"""GPTQ backend (GPTQModel) on a tiny Llama, plus the bit map -> module-target helpers it shares with
the AWQ and bnb backends. The library tests skip where gptqmodel is not installed (its container)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import MODULES, Rung, module_key
from helpers import BOOSTED, boosted_bitmap, rel_error
from tasks.quantize.gptq_targets import (
    base_rung,
    calibration_rows,
    check_module_keys,
    hf_module_name,
    module_regex,
    resolve_options,
    rung_groups,
    store_unquantized_16bit,
)



@pytest.fixture(scope="module")
def tiny(word_llama):
    return word_llama


# --- the shared, library-free helpers -------------------------------------------------------------

def test_module_regex_matches_exactly_its_modules():
    names = [hf_module_name(module_key(i, m)) for i in range(12) for m in MODULES]
    keys = ["1.self_attn.q_proj", "7.self_attn.q_proj", "3.mlp.down_proj", "10.mlp.down_proj"]
    pattern = re.compile(module_regex(keys))
    assert sorted(n for n in names if pattern.match(n)) == sorted(hf_module_name(k) for k in keys)
    assert not pattern.match("model.layers.1.self_attn.q_proj_extra")
    assert not pattern.match("model.layers.11.self_attn.q_proj")  # "1" must not prefix-match "11"


def test_base_rung_is_the_one_with_most_parameters():
    params = {module_key(i, m): 10 for i in range(2) for m in MODULES}
    bitmap = boosted_bitmap(params)
    assert base_rung(bitmap) == Rung(4, 64)
    groups = rung_groups(bitmap)
    assert list(groups) == [Rung(4, 64), Rung(8, 128)] and sorted(groups[Rung(8, 128)]) == sorted(BOOSTED)


def test_bitmap_keys_are_checked_against_the_model():
    params = {module_key(i, m): 1 for i in range(2) for m in MODULES}
    bitmap = uniform_bitmap({k: 1 for k in list(params)[:-1]}, Rung(4, 64))
    assert check_module_keys(bitmap, set(params)) == ["1.mlp.down_proj"]  # left out: stays 16-bit
    bitmap.modules["5.mlp.up_proj"] = Rung(4, 64)
    with pytest.raises(PipelineError, match="does not have"):
        check_module_keys(bitmap, set(params))


def test_calibration_must_be_int64_rows():
    assert calibration_rows(torch.zeros(2, 8, dtype=torch.int64), "gptq").shape == (2, 8)
    for bad in (None, torch.zeros(8, dtype=torch.int64), torch.zeros(2, 8, dtype=torch.int32)):
        with pytest.raises(PipelineError):
            calibration_rows(bad, "gptq")


def test_unknown_backend_options_are_refused():
    defaults = {"sym": True, "damp_percent": 0.05}
    assert resolve_options("gptq", defaults, {"sym": False}) == {"sym": False, "damp_percent": 0.05}
    with pytest.raises(PipelineError, match=r"unknown gptq option\(s\) \['bits'\]"):
        resolve_options("gptq", {"sym": True}, {"bits": 3})


def test_unquantized_tensors_are_stored_in_16_bit(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.randn(4, 4), "model.layers.0.input_layernorm.weight": torch.ones(4),
               "model.layers.0.self_attn.q_proj.scales": torch.ones(2, 4),
               "model.layers.0.self_attn.q_proj.qweight": torch.zeros(2, 4, dtype=torch.int32)},
              str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    assert store_unquantized_16bit(tmp_path, {"model.layers.0.self_attn.q_proj"}) == 2
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        dtypes = {k: fh.get_tensor(k).dtype for k in fh.keys()}
        assert fh.metadata() == {"format": "pt"}
    assert dtypes["model.embed_tokens.weight"] == torch.float16
    assert dtypes["model.layers.0.input_layernorm.weight"] == torch.float16
    assert dtypes["model.layers.0.self_attn.q_proj.scales"] == torch.float32  # the library's own format


# --- the backend --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("gptqmodel", reason="gptqmodel is not installed (the gptq container has it)")
    from tasks.quantize.gptq import GPTQBackend

    return GPTQBackend()


def test_gptq_check_says_what_it_can(backend, tiny):
    bitmap = boosted_bitmap(tiny["params"])
    backend.check(bitmap)
    bitmap.modules["1.mlp.up_proj"] = Rung(4, 16)
    with pytest.raises(PipelineError, match=r"gptq cannot express rungs \['b4g16'\].*group size one of"):
        backend.check(bitmap)


def test_gptq_dynamic_overrides_from_the_bitmap(backend, tiny):
    from tasks.quantize.gptq import quantize_config_args

    args = quantize_config_args(boosted_bitmap(tiny["params"]), ["1.mlp.up_proj"])
    assert (args["bits"], args["group_size"]) == (4, 64)
    (plus, boost), (minus, skip) = args["dynamic"].items()
    assert boost == {"bits": 8, "group_size": 128} and skip == {}
    assert re.match(plus[2:], "model.layers.0.self_attn.q_proj") and re.match(plus[2:], "model.layers.1.mlp.down_proj")
    assert not re.match(plus[2:], "model.layers.1.self_attn.q_proj")
    assert minus.startswith("-:") and re.match(minus[2:], "model.layers.1.mlp.up_proj")


def _packed_bits(handle, name, in_features):
    # GPTQ packs along in_features into int32 rows: rows = in_features * bits / 32.
    return handle.get_slice(f"{name}.qweight").get_shape()[0] * 32 // in_features


def test_gptq_uniform_4bit_roundtrip(backend, tiny, tmp_path):
    from safetensors import safe_open

    bitmap = uniform_bitmap(tiny["params"], Rung(4, 64))
    facts = backend.quantize(tiny["path"], bitmap, tiny["calibration"], tmp_path, {})
    assert facts["quant_seconds"] > 0 and facts["saved_bytes"] > 0 and facts["overrides"] == 0
    assert not list(tmp_path.glob("*.bin")) and (tmp_path / "bitmap.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert _packed_bits(fh, "model.layers.1.mlp.down_proj", 256) == 4
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    model = backend.load(tmp_path)
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert logits.dtype == torch.float32
    assert 1e-3 < rel_error(tiny["reference"], logits) < 0.5  # really quantized, still close
    # the default is asymmetric, which vLLM's GPTQ kernels do not take: the version says so
    assert backend.engine_checks(tmp_path)["vllm"].startswith("refused by vLLM 0.34's loader rules") and "asymmetric" in backend.engine_checks(tmp_path)["vllm"]


def test_gptq_kurtboost_map_gives_boosted_modules_8_bits(backend, tiny, tmp_path):
    from safetensors import safe_open

    facts = backend.quantize(tiny["path"], boosted_bitmap(tiny["params"]), tiny["calibration"], tmp_path, {})
    assert facts["base_rung"] == "b4g64" and facts["overrides"] == 1
    config = json.loads((tmp_path / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"]) == (4, 64)
    assert list(config["dynamic"].values()) == [{"bits": 8, "group_size": 128}]
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert _packed_bits(fh, "model.layers.0.self_attn.q_proj", 128) == 8
        assert _packed_bits(fh, "model.layers.1.mlp.down_proj", 256) == 8
        assert _packed_bits(fh, "model.layers.1.self_attn.q_proj", 128) == 4
        assert fh.get_slice("model.layers.1.mlp.down_proj.scales").get_shape()[0] == 256 // 128  # groups of 128
    model = backend.load(tmp_path)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert (layer.bits, layer.group_size) == (8, 128)
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert 1e-3 < rel_error(tiny["reference"], logits) < 0.5


def test_gptq_leaves_modules_outside_the_bitmap_in_16_bit(backend, tiny, tmp_path):
    from safetensors import safe_open

    params = {k: n for k, n in tiny["params"].items() if k != "1.mlp.up_proj"}
    backend.quantize(tiny["path"], uniform_bitmap(params, Rung(4, 64)), tiny["calibration"][:4, :32], tmp_path, {})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert [k for k in fh.keys() if ".1.mlp.up_proj." in k] == ["model.layers.1.mlp.up_proj.weight"]
        assert fh.get_slice("model.layers.1.mlp.up_proj.weight").get_dtype() == "F16"
    model = backend.load(tmp_path)
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")) is torch.nn.Linear
