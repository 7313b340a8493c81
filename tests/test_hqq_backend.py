import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.errors import PipelineError
from tasks.ladder import Rung
from tasks.model_io import linear_param_counts, load_model, quantizable_linears, read_config
from tasks.quantize.hqq import HQQBackend
from tasks.quantize.hqq_ops import quant_dequant


@pytest.fixture
def mixed_bitmap(tiny_model_dir):
    bm = uniform_bitmap(linear_param_counts(read_config(tiny_model_dir)), Rung(3, 64))
    bm.method = "test"
    bm.modules["0.self_attn.o_proj"] = Rung(8, 128)
    bm.modules["1.mlp.down_proj"] = Rung(4, 32)
    return bm


def test_hqq_bitmap_roundtrip_through_disk(tiny_model_dir, mixed_bitmap, tmp_path):
    backend = HQQBackend()
    facts = backend.quantize(tiny_model_dir, mixed_bitmap, None, tmp_path, {})
    assert facts["quant_seconds"] >= 0
    model = backend.load(tmp_path)
    layers = {k: m for k, m in model.named_modules() if type(m).__name__ == "HQQLinear"}
    assert len(layers) == 14
    assert layers["model.layers.0.self_attn.o_proj"].meta["nbits"] == 8
    assert layers["model.layers.0.self_attn.o_proj"].meta["group_size"] == 128
    assert layers["model.layers.1.mlp.down_proj"].meta["nbits"] == 4
    assert layers["model.layers.1.mlp.up_proj"].meta["nbits"] == 3

    # The reloaded module computes with exactly the weights HQQ's quantizer gives.
    ref = quantizable_linears(load_model(tiny_model_dir))
    for key in ("0.self_attn.o_proj", "1.mlp.up_proj"):
        w = layers[f"model.layers.{key}"].dequantize().reshape(ref[key].weight.shape)
        assert torch.allclose(w, quant_dequant(ref[key].weight, mixed_bitmap.modules[key]), atol=1e-5)

    ids = torch.randint(0, 49152, (1, 32))
    with torch.no_grad():
        fp = load_model(tiny_model_dir)(ids).logits
        q = model(ids).logits
    assert not torch.allclose(fp, q)  # really quantized
    assert (fp - q).abs().mean() < 0.5 * fp.abs().mean()  # but close


def test_hqq_saves_unquantized_tensors_in_16_bit(tiny_model_dir, mixed_bitmap, tmp_path):
    from safetensors import safe_open

    HQQBackend().quantize(tiny_model_dir, mixed_bitmap, None, tmp_path, {})
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert "lm_head.weight" not in f.keys()  # tied: stored once
        assert f.get_tensor("model.layers.0.self_attn.q_proj.W_q").dtype == torch.int32  # 3-bit packing


def test_hqq_refuses_rungs_off_the_ladder(mixed_bitmap):
    mixed_bitmap.modules["0.mlp.up_proj"] = Rung(5, 64)
    with pytest.raises(PipelineError, match="hqq cannot express"):
        HQQBackend().check(mixed_bitmap)
