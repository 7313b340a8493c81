"""Families that stack logical linears in one stored linear (Phi-3's qkv_proj and gate_up_proj).

The strongest check there is: a Phi-3 checkpoint and the Llama checkpoint holding the same weights
unstacked compute the same function, so the profiler must give both the same scores; HQQ must quantize
the stacked linear at the one rung its members share and reload it; an untied bit map is refused.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from tasks.bitmap import uniform_bitmap
from tasks.errors import PipelineError
from tasks.families import layout_for
from tasks.ladder import Rung
from tasks.model_io import linear_param_counts, read_config

SHAPE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)  # fmt: skip
Q, KV, INTER = 4 * 32, 2 * 32, 256


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """(phi3 dir, llama dir): the same random weights, stacked and unstacked."""
    import transformers as tf

    root = tmp_path_factory.mktemp("twins")
    torch.manual_seed(0)
    phi = tf.AutoModelForCausalLM.from_config(tf.Phi3Config(**SHAPE))
    phi.save_pretrained(root / "phi3")
    llama = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**SHAPE, hidden_act=phi.config.hidden_act))
    state = {}
    for name, value in phi.state_dict().items():
        if "qkv_proj" in name:
            for part, rows in (("q_proj", slice(0, Q)), ("k_proj", slice(Q, Q + KV)), ("v_proj", slice(Q + KV, None))):
                state[name.replace("qkv_proj", part)] = value[rows]
        elif "gate_up_proj" in name:
            state[name.replace("gate_up_proj", "gate_proj")], state[name.replace("gate_up_proj", "up_proj")] = value[:INTER], value[INTER:]
        else:
            state[name] = value
    llama.load_state_dict(state, strict=True)
    llama.save_pretrained(root / "llama")
    ids = torch.randint(3, 512, (1, 24))
    with torch.no_grad():
        assert torch.allclose(phi(ids).logits, llama(ids).logits, atol=1e-5)  # the twins really are one function
    return root / "phi3", root / "llama"


def test_layout_names_each_logical_module_by_its_rows(twins):
    layout = layout_for(read_config(twins[0]))
    assert layout.stacked and layout.linears == {
        "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "self_attn.o_proj": ("self_attn.o_proj",),
        "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
        "mlp.down_proj": ("mlp.down_proj",),
    }
    assert (layout.rows["self_attn.v_proj"].start, layout.rows["self_attn.v_proj"].stop) == (Q + KV, Q + 2 * KV)
    assert not layout_for(read_config(twins[1])).stacked


def test_a_stacked_family_profiles_as_its_unstacked_twin(twins, tmp_path):
    from tasks.profiling.driver import run_profiling

    ids = torch.randint(3, 512, (4, 64))
    phi = pd.read_csv(run_profiling(twins[0], ids, tmp_path / "phi3", batch_size=2, fisher_samples=2))
    llama = pd.read_csv(run_profiling(twins[1], ids, tmp_path / "llama", batch_size=2, fisher_samples=2))
    assert list(phi["module"]) == list(llama["module"]) and len(phi) == 2 * 7 * 12
    # Everything but the Fisher column is computed from the same tensors in the same order: equal.
    exact = [c for c in phi.select_dtypes("number").columns if c != "fisher_dloss"]
    pd.testing.assert_frame_equal(phi[exact], llama[exact], check_exact=True)
    pd.testing.assert_series_equal(phi["fisher_dloss"], llama["fisher_dloss"], rtol=1e-5)


def _tied_bitmap(path):
    bitmap = uniform_bitmap(linear_param_counts(read_config(path)), Rung(4, 64))
    for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        bitmap.modules[f"0.{module}"] = Rung(8, 32)
    bitmap.modules["1.mlp.down_proj"] = Rung(3, 128)
    return bitmap


def test_hqq_quantizes_a_stacked_linear_at_its_members_rung_and_reloads_it(twins, tmp_path):
    from tasks.quantize.hqq import HQQBackend

    backend = HQQBackend()
    phi_dir, llama_dir = twins
    (tmp_path / "phi3").mkdir(), (tmp_path / "llama").mkdir()
    backend.quantize(phi_dir, _tied_bitmap(phi_dir), None, tmp_path / "phi3", {})
    backend.quantize(llama_dir, _tied_bitmap(llama_dir), None, tmp_path / "llama", {})
    phi, llama = backend.load(tmp_path / "phi3"), backend.load(tmp_path / "llama")
    layers = {k: m for k, m in phi.named_modules() if type(m).__name__ == "HQQLinear"}
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down per layer
    assert layers["model.layers.0.self_attn.qkv_proj"].meta["nbits"] == 8
    assert layers["model.layers.1.self_attn.qkv_proj"].meta["nbits"] == 4
    assert layers["model.layers.1.mlp.down_proj"].meta["nbits"] == 3
    ids = torch.randint(3, 512, (1, 24))
    with torch.no_grad():
        # Not equal to the twin's: HQQ's optimizer runs over the whole stacked matrix. But close, and quantized.
        a, b = phi(ids).logits, llama(ids).logits
    assert (a - b).abs().mean() < 0.05 * b.abs().mean()


def test_an_untied_bit_map_is_refused_for_a_stacked_family(twins, tmp_path):
    from tasks.quantize.hqq import HQQBackend

    bitmap = _tied_bitmap(twins[0])
    bitmap.modules["1.self_attn.k_proj"] = Rung(2, 64)
    with pytest.raises(PipelineError, match=r"phi3 stores q_proj, k_proj, v_proj of layer 1 as one qkv_proj"):
        HQQBackend().quantize(twins[0], bitmap, None, tmp_path, {})


def test_the_planner_ties_every_backend_for_a_stacked_family():
    from tasks.orchestration.config import PipelineConfig
    from tasks.allocation.plan import plan_variants

    cfg = PipelineConfig.from_dict({"backends": ["hqq"], "methods": ["sensiboost", "optimal"], "budgets": ["b3g64"]})
    assert not any(s.options.get("tie_fused") for s in plan_variants(cfg))
    assert all(s.options.get("tie_fused") for s in plan_variants(cfg, "phi3") if s.method != "uniform")
    untied = PipelineConfig.from_dict({**cfg.to_dict(), "method_options": {"optimal": {"tie_fused": False}}})
    with pytest.raises(PipelineError, match="tie_fused cannot be false for a phi3 model"):
        plan_variants(untied, "phi3")
