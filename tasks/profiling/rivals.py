"""The rival allocators' scores (docs/methods.md §10), measured in the backward pass when asked (opt-in).

Both weigh a module's quantization error at a rung by the calibration loss's gradient, on the gradient
samples, with the rest of the model in full precision:

- `taylor_dloss`, NVIDIA ModelOpt's `auto_quantize` default ("gradient"): per module and format the sum
  over tokens and output features of g^2 * dY^2 (`_get_auto_quantize_score`), where g = dL/dY and dY is the
  output change of that module alone quantized. We report 1/2 of it per gradient token, the second-order
  Taylor term in nats per token. It differs from our `fisher_dloss` in one step only: ModelOpt multiplies
  g^2 and dY^2 token by token, `fisher_dloss` multiplies their per-feature means (E_t[g^2] * E_t[dY^2]),
  which lets it use every calibration token for dY (through the input Gram matrix) and costs no
  per-rung output; the two coincide where the squared gradient and the squared error are uncorrelated
  over tokens.
- `delta_loss`, Intel AutoRound's `AutoScheme` (`auto_scheme/delta_loss.py`, its weight score): per module
  and scheme the sum over calibration batches of sum |dL/dW * (W - Q(W))|, a first-order, absolute
  estimate; our batches are single windows, and we report it per gradient token.

Cost: every rung's error again per layer (the forward pass does not keep them) plus, for taylor, one
product of the layer inputs with every distinct rung's error (tokens x in x rungs x out); printed as the
phase `rivals`.
"""

from __future__ import annotations

import torch

COLUMNS = ("taylor_dloss", "delta_loss")


def accumulate(sums: dict[str, torch.Tensor], key: str, x: torch.Tensor, g: torch.Tensor, errors: torch.Tensor, rungs: int,
               expand: list[int] | None = None) -> None:  # fmt: skip
    """Add one backward step of module `key` to `sums` ({f"{column}:{key}": float64 [rungs]}).
    `expand`: the ladder's rungs as indices into `errors`' rungs, where `errors` holds distinct ones only
    (gguf types that fall back to one written type on these rows share one error, so one product).

    x [windows, seq, in]: the module's inputs; g [windows, seq, out]: d(summed NLL)/d(output);
    errors [rungs * out, in]: W - dequant(HQQ_rung(W)) of every rung, stacked along the rows. An MoE
    expert's x and g are its routed tokens [tokens, in] without their windows: its delta_loss takes one
    gradient per backward step (GRAD_BATCH windows) instead of one per window."""
    if x.dim() == 2:
        x, g = x.unsqueeze(0), g.unsqueeze(0)
    out = g.shape[-1]
    flat_x, flat_g = x.reshape(-1, x.shape[-1]).float(), g.reshape(-1, out).float()
    # taylor: sum_t sum_o g^2 (E_r x_t)_o^2 for every rung r at once.
    dy = flat_x @ errors.t()  # [tokens, rungs * out]
    taylor = dy.square_().view(-1, rungs, out).mul_(flat_g.square().unsqueeze(1)).sum(dim=(0, 2), dtype=torch.float64)
    del dy
    # delta_loss: per window, |g_w^T x_w (x) E_r| summed.
    delta = torch.zeros(rungs, dtype=torch.float64)
    stacked = errors.view(rungs, out, -1)
    for w in range(x.shape[0]):
        grad_w = g[w].reshape(-1, out).float().t() @ x[w].reshape(-1, x.shape[-1]).float()  # dL/dW of this window
        delta += (stacked * grad_w).abs_().sum(dim=(1, 2), dtype=torch.float64).cpu()
    for column, value in (("taylor_dloss", 0.5 * taylor.cpu()), ("delta_loss", delta)):
        value = value[expand] if expand is not None else value
        name = f"{column}:{key}"
        sums[name] = sums[name] + value if name in sums else value


def columns(sums: dict[str, torch.Tensor], key: str, grad_tokens: int) -> dict[str, list[float]]:
    """{column: per-rung value per gradient token} of module `key`."""
    return {c: (sums[f"{c}:{key}"] / grad_tokens).tolist() for c in COLUMNS}
