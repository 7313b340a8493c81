"""Multiply-adds per token of a plain forward pass and of the work SPEC's sensitivity scores cannot avoid.

The profiling overhead benchmark divides the profiling time by the time of one plain forward pass.
SensiBoost's attn_in part (SPEC section 3) re-runs q, k, v with b4g64 weights and o_proj on the changed
attention output; its mlp_gate part re-runs gate, up and down the same way. So every linear of every
decoder layer runs twice over all calibration tokens, once in full precision and once in these re-runs,
whatever else the stage computes. Dividing by the forward's multiply-adds (each decoder linear once, plus
the output embedding over every position) gives a lower bound on that time ratio for any exact
implementation on any hardware. It leaves out attention scores, norms, HQQ itself and every other score,
so the true floor is higher.
"""

from __future__ import annotations

from tasks.ladder import MODULES


def linear_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each decoder linear, from a transformers config (Llama family)."""
    hidden = config.hidden_size
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    inter = config.intermediate_size
    shapes = {
        "self_attn.q_proj": (hidden, heads * head_dim),
        "self_attn.k_proj": (hidden, kv_heads * head_dim),
        "self_attn.v_proj": (hidden, kv_heads * head_dim),
        "self_attn.o_proj": (heads * head_dim, hidden),
        "mlp.gate_proj": (hidden, inter),
        "mlp.up_proj": (hidden, inter),
        "mlp.down_proj": (inter, hidden),
    }
    assert set(shapes) == set(MODULES)
    return shapes


def layer_macs(config) -> int:
    """Multiply-adds per token of one decoder layer's seven linears."""
    return sum(i * o for i, o in linear_shapes(config).values())


def forward_macs(config) -> int:
    """Multiply-adds per token of a plain forward's linears: every decoder layer, then the output
    embedding (vocab x hidden, tied or not) at every position."""
    return config.num_hidden_layers * layer_macs(config) + config.vocab_size * config.hidden_size


def sensitivity_floor_ratio(config) -> float:
    """Least profiling time / forward time that an exact SensiBoost sensitivity allows (module docstring):
    twice the decoder linears' multiply-adds over the forward's."""
    return 2 * config.num_hidden_layers * layer_macs(config) / forward_macs(config)
