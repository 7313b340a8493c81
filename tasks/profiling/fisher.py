"""Output gradients of the calibration loss, streamed backward one decoder layer at a time.

They weight each module's output error by how much the model's loss cares about it: the diagonal
Fisher (empirical, squared gradients) of a linear's outputs, as in BRECQ (Li et al., ICLR 2021) and the
output side of K-FAC. For a weight error dW of module m with inputs x_t and output gradients
g_t = d(sum of calibration NLL)/d(y_t), the second-order (Fisher) estimate of the loss increase is

    dL ~= 1/2 sum_t (g_t . dW x_t)^2  ~=  1/2 sum_o  E_t[g_{t,o}^2] * sum_t (dW x_t)_o^2

(tokens independent, gradients independent of the error, off-diagonal Fisher dropped), which we divide
by the gradient tokens to get nats per calibration token. The second factor is the per-row output error
the profiler already has (`QuadraticForm.row_sums`); this module supplies the first.

Memory stays bounded like the forward pass: the layer inputs of the gradient samples are stashed on disk
during the forward pass, the loss head reads the output embedding in row chunks, and the backward pass
rebuilds one layer at a time from the checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tasks.families import expert_of

TOKENS = "tokens:"  # key prefix of an expert's gradient-token count among the squared-gradient sums


class InputStash:
    """Layer inputs [samples, seq, hidden] of the gradient samples, one safetensors file per layer, in
    `directory` (kept across a killed attempt, so that a resumed profile finds the earlier layers')."""

    def __init__(self, directory: str | Path):
        self._dir = Path(directory)
        self._dir.mkdir(parents=True, exist_ok=True)

    def put(self, index: int, hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        tmp = self._dir / f"{index}.safetensors.tmp"
        save_file({"hidden": hidden.contiguous().cpu()}, str(tmp))
        tmp.replace(self._dir / f"{index}.safetensors")

    def get(self, index: int, device: torch.device | str = "cpu") -> torch.Tensor:
        from safetensors.torch import load_file

        return load_file(str(self._dir / f"{index}.safetensors"), device=str(device))["hidden"]

    def put_grams(self, index: int, grams: dict[str, torch.Tensor], tokens: dict[str, float]) -> None:
        """Layer `index`'s input Gram matrices over every calibration token (float32) and their token
        counts: what GPTQ's solver needs to rebuild its errors in the backward pass."""
        from safetensors.torch import save_file

        tmp = self._dir / f"{index}.grams.safetensors.tmp"
        save_file({**{f"h.{k}": h.float().contiguous().cpu() for k, h in grams.items()},
                   **{f"n.{k}": torch.tensor([tokens[k]], dtype=torch.float64) for k in grams}}, str(tmp))  # fmt: skip
        tmp.replace(self._dir / f"{index}.grams.safetensors")

    def get_grams(self, index: int, device: torch.device | str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        from safetensors.torch import load_file

        saved = load_file(str(self._dir / f"{index}.grams.safetensors"), device=str(device))
        return ({k[2:]: v for k, v in saved.items() if k.startswith("h.")}, {k[2:]: float(v) for k, v in saved.items() if k.startswith("n.")})

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


def _capped(z: torch.Tensor, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits after Gemma's soft-capping c tanh(z / c), and its derivative 1 - tanh^2 (None: no cap)."""
    if not softcap:
        return z, None
    t = torch.tanh(z / softcap)
    return t * softcap, 1.0 - t * t


def head_gradient(hidden: torch.Tensor, ids: torch.Tensor, norm: torch.nn.Module, read_rows, vocab: int,
                  rows: int = 8192, softcap: float | None = None) -> tuple[torch.Tensor, float]:  # fmt: skip
    """d(sum NLL)/d(hidden) of next-token prediction through the final norm and the output embedding
    (and the final logit soft-capping, when the family has one), and the NLL sum. `read_rows(start, stop)`
    returns rows [start, stop) of the output embedding, so the [tokens, vocab] logits are never formed:
    a log-sum-exp pass, then a softmax-gradient pass."""
    with torch.enable_grad():
        h = hidden.detach().requires_grad_(True)
        normed = norm(h)
    x = normed.detach()[:, :-1].reshape(-1, normed.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    spans = [(s, min(s + rows, vocab)) for s in range(0, vocab, rows)]
    lse = torch.full((x.shape[0],), -torch.inf, device=x.device)
    target_logit = torch.zeros(x.shape[0], device=x.device)
    for start, stop in spans:
        w = read_rows(start, stop)
        logits, _ = _capped(x @ w.t(), softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))
        hit = (targets >= start) & (targets < stop)
        target_logit[hit] = logits[hit, targets[hit] - start]
    grad_x = torch.zeros_like(x)
    for start, stop in spans:  # d NLL / d x = softmax(x W^T) W - W[target] (times the cap's derivative)
        w = read_rows(start, stop)
        logits, slope = _capped(x @ w.t(), softcap)
        hit = (targets >= start) & (targets < stop)
        if slope is None:
            grad_x += torch.exp(logits - lse[:, None]) @ w
            grad_x[hit] -= w[targets[hit] - start]
        else:
            g = torch.exp(logits - lse[:, None]).mul_(slope)
            rows_hit = hit.nonzero(as_tuple=True)[0]
            g[rows_hit, targets[hit] - start] -= slope[rows_hit, targets[hit] - start]
            grad_x += g @ w
    grad_normed = torch.zeros_like(normed)
    grad_normed[:, :-1] = grad_x.view(normed.shape[0], -1, normed.shape[-1])  # the last position predicts nothing
    (grad_hidden,) = torch.autograd.grad(normed, h, grad_normed)
    return grad_hidden, float((lse - target_logit).sum(dtype=torch.float64))


def layer_backward(layer: torch.nn.Module, layout, hidden: torch.Tensor, grad_out: torch.Tensor, capture: dict | None = None,
                   **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Backpropagate `grad_out` (d loss / d layer output) through `layer` at input `hidden`.

    Returns d loss / d input and, per logical linear (`layout`, tasks.families) that ran, the float64 sums
    over tokens of its squared output gradients, one per output feature; for an MoE expert also, under
    f"{TOKENS}{module}", the number of tokens routed to it. A `capture` dict receives, per logical
    linear, its inputs and output gradients (for the rival scores, tasks.profiling.rivals)."""
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            outputs[name] = output
            if capture is not None:
                inputs[name] = args[0].detach()

        return hook

    names = list(layout.linears)  # the stored linears
    handles = [layer.get_submodule(name).register_forward_hook(keep(name)) for name in names]
    try:
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(True)
            out = layer(h, **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            names = [name for name in names if name in outputs]  # an expert nothing was routed to did not run
            grads = torch.autograd.grad(out, [h] + [outputs[name] for name in names], grad_out)
    finally:
        for handle in handles:
            handle.remove()
    # A float32 norm per feature, then float64 across steps: no float64 copy of the gradients (relative
    # error ~1e-7 over a step's tokens, far below the sampling noise of the estimate).
    squares = {}
    for name, g in zip(names, grads[1:]):
        flat = g.reshape(-1, g.shape[-1])
        squares.update(layout.split_outputs(name, torch.linalg.vector_norm(flat, dim=0).double().square()))
        if layout.experts and expert_of(name) is not None:  # the tokens routed to this expert in this step
            squares[f"{TOKENS}{name}"] = torch.tensor([float(flat.shape[0])], dtype=torch.float64, device=flat.device)
        if capture is not None:  # a copy: down_proj's gradient may be the caller's grad_out, which it overwrites
            capture.update({m: (inputs[name], part.clone()) for m, part in layout.split_outputs(name, g).items()})
    return grads[0], squares


def fisher_loss_delta(row_errors: torch.Tensor, grad_squares: torch.Tensor, tokens: int, grad_tokens: int) -> torch.Tensor:
    """1/2 sum_o E[g_o^2] * E[(dW x)_o^2] per rung, in nats per token (see the module docstring).

    row_errors [rungs, out]: sum over the calibration tokens of (dW x_t)_o^2; grad_squares [out]: sum over
    the gradient tokens of g_o^2."""
    return 0.5 * (row_errors.double() @ grad_squares.double()) / (tokens * grad_tokens)
