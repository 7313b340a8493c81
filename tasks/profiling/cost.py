"""Multiply-adds per token of a plain forward pass and of the work the sensitivity scores (docs/methods.md §3) cannot avoid.

The profiling overhead benchmark divides the profiling time by the time of one plain forward pass.
SensiBoost's attn_in part (docs/methods.md §3) re-runs q, k, v with b4g64 weights and o_proj on the changed
attention output; its mlp_gate part re-runs gate, up and down the same way. So every linear of every
decoder layer runs twice over all calibration tokens, once in full precision and once in these re-runs,
whatever else the stage computes. Dividing by the forward's multiply-adds (each decoder linear once, plus
the output embedding over every position) gives a lower bound on that time ratio for any exact
implementation on any hardware. It leaves out attention scores, norms, HQQ itself and every other score,
so the true floor is higher.

A linear does one multiply-add per weight per token, so the counts are parameter counts; `config` is the
checkpoint's config.json as a dict (tasks.model_io.read_config).
"""

from __future__ import annotations

from tasks.model_io import linear_param_counts


def decoder_macs(config: dict) -> int:
    """Multiply-adds per token of every decoder layer's seven linears."""
    return sum(linear_param_counts(config).values())


def forward_macs(config: dict) -> int:
    """Multiply-adds per token of a plain forward's linears: the decoder layers, then the output
    embedding (vocab x hidden, tied or not) at every position."""
    return decoder_macs(config) + config["vocab_size"] * config["hidden_size"]


def sensitivity_floor_ratio(config: dict) -> float:
    """Least profiling time / forward time that an exact SensiBoost sensitivity allows (module docstring):
    twice the decoder linears' multiply-adds over the forward's."""
    return 2 * decoder_macs(config) / forward_macs(config)
