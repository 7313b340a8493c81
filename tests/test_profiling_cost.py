"""The multiply-add counts behind the profiling benchmark's floor, checked against torch's FLOP counter
on real transformers models (grouped-query and multi-head attention, tied and untied embeddings)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.profiling.cost import decoder_macs, forward_macs, sensitivity_floor_ratio


def _linear_flops(fn) -> int:
    """FLOPs of the dense matrix products (what nn.Linear dispatches to) that fn runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    counts = counter.get_flop_counts()["Global"]
    return sum(n for op, n in counts.items() if op in (torch.ops.aten.mm, torch.ops.aten.addmm))


@pytest.mark.parametrize(
    "arch", [dict(num_key_value_heads=2, tie_word_embeddings=True), dict(num_key_value_heads=4, tie_word_embeddings=False)]
)
def test_counts_match_the_flop_counter_on_a_real_model(arch):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, attn_implementation="eager", **arch)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    shapes = config.to_dict()  # what read_config gives for the saved checkpoint
    ids = torch.randint(0, 300, (2, 24))
    tokens = ids.numel()
    with torch.no_grad():
        assert _linear_flops(lambda: model(input_ids=ids, use_cache=False)) == 2 * tokens * forward_macs(shapes)
        layer = model.model.layers[0]
        h = torch.randn(2, 24, 64)
        # The re-runs the sensitivity parts need: the attention block and the MLP, every linear once more.
        attn = lambda: layer.self_attn(h, position_embeddings=model.model.rotary_emb(h, torch.arange(24)[None]), attention_mask=None)  # noqa: E731
        assert _linear_flops(attn) + _linear_flops(lambda: layer.mlp(h)) == 2 * tokens * decoder_macs(shapes) // config.num_hidden_layers


def test_floor_for_smollm2_and_llama2_7b_shapes():
    from transformers import LlamaConfig

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3).to_dict()  # fmt: skip
    llama2 = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32).to_dict()  # fmt: skip
    # 2 x 106.2M / (106.2M + 28.3M output embedding); a 7B model spends far less of its forward in the head.
    assert decoder_macs(smol) == 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q, o; k, v (3 KV heads); MLP
    assert sensitivity_floor_ratio(smol) == pytest.approx(1.579, abs=1e-3)
    assert sensitivity_floor_ratio(llama2) == pytest.approx(1.960, abs=1e-3)


def test_exact_scores_floor_for_smollm2_at_both_calibration_sizes():
    from transformers import LlamaConfig

    from tasks.profiling.cost import exact_scores_floor_ratio

    smol = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3).to_dict()  # fmt: skip
    forward = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536) + 49152 * 576
    gram = 30 * (3 * 576**2 + 1536**2) / 2 / forward  # attention, o_proj and MLP inputs 576 wide, down_proj's 1536
    # d_out x d_in^2 / 2 per module and rung: q, o 576 x 576^2; k, v 192 x 576^2; gate, up 1536 x 576^2; down 576 x 1536^2
    errors = 12 * 30 * (2 * 576**3 + 2 * 192 * 576**2 + 2 * 1536 * 576**2 + 576 * 1536**2) / 2
    assert gram == pytest.approx(0.375, abs=1e-3)
    for samples, expected in ((32, 2.69), (128, 2.14)):
        want = 1.579 + gram + 2 * 8 / samples + errors / (samples * 512 * forward)
        assert exact_scores_floor_ratio(smol, samples, 512, fisher_samples=8) == pytest.approx(want, abs=1e-3)
        assert exact_scores_floor_ratio(smol, samples, 512, fisher_samples=8) == pytest.approx(expected, abs=0.006)
