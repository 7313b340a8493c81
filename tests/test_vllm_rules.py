"""vLLM's loader rules on saved GPTQ and compressed-tensors checkpoints (config.json + tensor shapes): what
vLLM 0.34's code refuses is refused here, with its reason, and what it takes passes."""

from __future__ import annotations

import json
import struct

from tasks.quantize.vllm_rules import compressed_tensors_refusals, gptq_refusals, tensor_shapes, vllm_verdict

MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
IN = {"self_attn.o_proj": 576, "mlp.down_proj": 1536}  # SmolLM2's widths: 576 elsewhere


def gptq_shapes(bits: int = 4, layers: int = 2) -> dict:
    return {f"model.layers.{i}.{m}.qweight": [IN.get(m, 576) * bits // 32, 64] for i in range(layers) for m in MODULES}


def gptq(**q) -> dict:
    return {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False, **q}}


def test_gptq_symmetric_4_bit_at_a_marlin_group_size_loads():
    assert gptq_refusals(gptq(), gptq_shapes()) == []
    assert vllm_verdict([]).startswith("loads")


def test_gptq_what_vllm_refuses_is_refused_with_its_reason():
    assert "asymmetric" in gptq_refusals(gptq(sym=False), gptq_shapes())[0], "the project's default (asymmetric) is not vLLM's"
    assert "3-bit" in gptq_refusals(gptq(bits=3), gptq_shapes(3))[0]
    assert "not a whole number of groups of 128" in " ".join(gptq_refusals(gptq(group_size=128), gptq_shapes())), "576 = 4.5 x 128"
    assert "act-order" in gptq_refusals(gptq(desc_act=True), gptq_shapes())[0]
    assert "lacks sym" in gptq_refusals({"quantization_config": {"bits": 4, "group_size": 64, "desc_act": False}}, {})[0]


def test_gptq_dynamic_overrides_must_cover_a_fused_linear_and_its_vllm_name():
    only_q = gptq(dynamic={r"+:^model\.layers\.1\.self_attn\.q_proj$": {"bits": 8}})
    assert any("model.layers.1.self_attn.qkv_proj" in r for r in gptq_refusals(only_q, gptq_shapes()))
    whole = gptq(dynamic={r"+:^model\.layers\.1\.self_attn\.(q|k|v|qkv)_proj$": {"bits": 8}})
    shapes = {**gptq_shapes(), **{f"model.layers.1.self_attn.{p}.qweight": [576 * 8 // 32, 64] for p in ("q_proj", "k_proj", "v_proj")}}
    assert gptq_refusals(whole, shapes) == []


def ct(groups: dict, ignore=("lm_head",)) -> dict:
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": list(ignore),
                                    "config_groups": {name: {"targets": targets, "weights": {"num_bits": bits, "group_size": size, "symmetric": False,
                                                                                             "strategy": "group"}}
                                                      for name, (targets, bits, size) in groups.items()}}}  # fmt: skip


def ct_shapes(bits: int = 4) -> dict:
    return {f"model.layers.{i}.{m}.weight_packed": [64, IN.get(m, 576) * bits // 32] for i in range(2) for m in MODULES}


def test_compressed_tensors_group_sizes_and_fused_shards():
    every = ct({"group_0": ([r"re:.*_proj$"], 4, 64)})
    assert compressed_tensors_refusals(every, ct_shapes()) == []
    assert "not a whole number of groups of 128" in compressed_tensors_refusals(ct({"g": ([r"re:.*_proj$"], 4, 128)}), ct_shapes())[0]
    split = ct({"group_0": ([r"re:.*q_proj$"], 8, 64), "group_1": ([r"re:.*_proj$"], 4, 64)})
    assert any("qkv_proj" in r for r in compressed_tensors_refusals(split, ct_shapes()))


def test_tensor_shapes_reads_the_safetensors_headers(tmp_path):
    header = json.dumps({"a.qweight": {"dtype": "I32", "shape": [72, 64], "data_offsets": [0, 0]}, "__metadata__": {}}).encode()
    (tmp_path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    assert tensor_shapes(tmp_path) == {"a.qweight": [72, 64]}
