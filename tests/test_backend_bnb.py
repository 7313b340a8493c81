"""bitsandbytes backend on a tiny Llama: uniform nf4/fp4/int8 and the two-level 4/8-bit map. Skips
where bitsandbytes is not installed (the bnb container has it)."""

from __future__ import annotations

import json

import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import Rung
from helpers import BOOSTED, boosted_bitmap, rel_error
from tasks.model_io import load_model

pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (the bnb container has it)")

from tasks.quantize.bnb import BnBBackend, plan  # noqa: E402


@pytest.fixture(scope="module")
def tiny(word_llama):
    return word_llama


def test_plan_splits_a_boost_map_into_4_and_8_bit(tiny):
    layout = plan(boosted_bitmap(tiny["params"]))
    assert layout["mode"] == "4bit" and sorted(layout["int8"]) == sorted(BOOSTED) and len(layout["four"]) == 12
    assert plan(uniform_bitmap(tiny["params"], Rung(8, 32)))["mode"] == "int8"


@pytest.mark.parametrize(
    "rung, message",
    [(Rung(3, 64), r"bnb cannot express rungs \['b3g64'\].*4-bit .* and 8-bit"),
     (Rung(4, 128), r"bnb cannot express rungs \['b4g128'\]: its 4-bit blocksize is 64")],
)
def test_bnb_check_refuses_what_it_cannot_express(tiny, rung, message):
    bitmap = boosted_bitmap(tiny["params"])
    bitmap.modules["1.mlp.up_proj"] = rung
    with pytest.raises(PipelineError, match=message):
        BnBBackend().check(bitmap)


@pytest.mark.parametrize("quant_type, rung, linear, error_bound",
                         [("nf4", Rung(4, 64), "Linear4bit", 0.5), ("fp4", Rung(4, 64), "Linear4bit", 0.5),
                          ("int8", Rung(8, 128), "Linear8bitLt", 0.1)])
def test_bnb_uniform_roundtrip(tiny, tmp_path, quant_type, rung, linear, error_bound):
    from safetensors import safe_open

    backend = BnBBackend()
    options = {} if quant_type == "int8" else {"quant_type": quant_type}
    facts = backend.quantize(tiny["path"], uniform_bitmap(tiny["params"], rung), None, tmp_path, options)
    assert facts["mode"] == quant_type and facts["saved_bytes"] > 0
    assert not list(tmp_path.glob("*.bin"))
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["load_in_4bit"] == (quant_type != "int8")
    if quant_type != "int8":
        assert saved["bnb_4bit_quant_type"] == quant_type
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    model = backend.load(tmp_path)
    assert type(model.get_submodule("model.layers.1.mlp.up_proj")).__name__ == linear
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert 1e-3 < rel_error(tiny["reference"], logits) < error_bound  # really quantized, still close


def test_bnb_boosted_modules_are_int8_after_reload(tiny, tmp_path):
    from safetensors import safe_open

    backend = BnBBackend()
    facts = backend.quantize(tiny["path"], boosted_bitmap(tiny["params"]), None, tmp_path, {})
    assert facts["int8_modules"] == 2 and facts["mode"] == "nf4"
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as fh:
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.weight").dtype == torch.int8
        assert fh.get_tensor("model.layers.0.self_attn.q_proj.SCB").shape == (128,)  # one scale per row
        assert fh.get_tensor("model.layers.1.self_attn.q_proj.weight").dtype == torch.uint8  # packed nf4
    model = backend.load(tmp_path)
    kinds = {name: type(model.get_submodule(f"model.layers.{name}")).__name__ for name in tiny["params"]}
    assert {k for k, v in kinds.items() if v == "Linear8bitLt"} == set(BOOSTED)
    assert {v for k, v in kinds.items() if k not in BOOSTED} == {"Linear4bit"}
    with torch.no_grad():
        logits = model(tiny["ids"]).logits
    assert 1e-3 < rel_error(tiny["reference"], logits) < 0.5
    # The int8 modules reproduce the quantized weights: their error against the float weight is tiny.
    fp = load_model(tiny["path"]).get_submodule("model.layers.0.self_attn.q_proj")
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    x = torch.randn(4, 128)
    with torch.no_grad():
        assert rel_error(fp(x), q(x)) < 0.02
