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


def _input_widths(config: dict) -> dict[str, int]:
    """Input width of each of the seven linears (a dense layer's; what the Gram matrices are built over)."""
    hidden = config["hidden_size"]
    attn = config["num_attention_heads"] * (config.get("head_dim") or hidden // config["num_attention_heads"])
    return {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": attn, "gate_proj": hidden, "up_proj": hidden,
            "down_proj": config["intermediate_size"]}  # fmt: skip


def exact_scores_floor_ratio(config: dict, samples: int, seq_len: int, fisher_samples: int, rungs: int = 12) -> float:
    """Least profiling time / forward time for every exact score of the default profile on a dense model:
    the sensitivity floor, plus what the other scores cannot avoid (in multiply-adds, with the forward's):
    - the input Gram matrices of out_err and fisher_dloss, one per distinct input (q/k/v share one, gate/up
      one), only the blocks on and above the diagonal: d_in^2 / 2 per token;
    - the Fisher pass: within the memory bound each layer is recomputed from its stashed input and the
      gradient propagated back through it, at least two forwards over its windows;
    - the per-row output error of every rung, diag(dW H dW^T) with H's Cholesky factor: d_out x d_in^2 / 2
      per module and rung, once per model (so its share falls as calibration grows)."""
    widths = _input_widths(config)
    layers = config["num_hidden_layers"]
    gram = layers * sum(widths[m] ** 2 for m in ("q_proj", "o_proj", "gate_proj", "down_proj")) / 2
    params = linear_param_counts(config)
    per_row_error = rungs * sum(n * widths[key.rpartition(".")[2]] for key, n in params.items()) / 2
    forward = forward_macs(config)
    return (sensitivity_floor_ratio(config) + gram / forward + 2 * min(fisher_samples, samples) / samples
            + per_row_error / (samples * seq_len * forward))  # fmt: skip
