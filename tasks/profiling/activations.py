"""Scores that need calibration activations: sums for LIM and MSEs, input Gram matrices, output errors.

Pure numerics on CPU tensors. The key identity: for a linear y = W x and a weight error dW, the summed
squared output error over tokens is  sum_t ||dW x_t||^2 = trace(dW H dW^T)  with  H = sum_t x_t x_t^T.
Accumulating H once per module input therefore gives the output error of every ladder rung (and the
SensiBoost attn_out / mlp_down parts) exactly, without running the quantized module on the data.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _spans(width: int, block: int) -> list[tuple[int, int]]:
    """[0, width) cut into about width/block equal spans."""
    count = max(1, round(width / block))
    edges = [round(i * width / count) for i in range(count + 1)]
    return list(zip(edges[:-1], edges[1:]))


class Gram:
    """Running H = X^T X over the rows (tokens) of X, in float64.

    H is symmetric, so only the blocks on and above the diagonal are multiplied (about 55-65% of the
    work of one full X^T X product for the widths of real models). Blocks of about 384 columns were the
    fastest on CPU for 576 and 1536 wide inputs (18% less time than 192, 28% less than one full product).
    """

    def __init__(self, dim: int, block: int = 384, device: torch.device | str | None = None):
        self.dim = dim
        self.tokens = 0
        self._h = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self._spans = _spans(dim, block)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).float()
        for i, (a0, a1) in enumerate(self._spans):
            left = x[:, a0:a1].t()
            for b0, b1 in self._spans[i:]:
                self._h[a0:a1, b0:b1] += left @ x[:, b0:b1]
        self.tokens += x.shape[0]

    def matrix(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full symmetric H: the upper triangle mirrored (only upper blocks were accumulated)."""
        upper = torch.triu(self._h)
        return (upper + torch.triu(self._h, 1).t()).to(dtype)


def quadratic_error(dw: torch.Tensor, h: torch.Tensor, out: torch.Tensor | None = None) -> float:
    """trace(dW H dW^T): the summed squared output error sum_t ||dW x_t||^2 when H = sum_t x_t x_t^T."""
    prod = torch.mm(dw, h, out=out) if out is not None else dw @ h
    return prod.mul_(dw).sum(dtype=torch.float64).item()


class QuadraticForm:
    """Row sums of (D H) * D, i.e. sum_t (d_r . x_t)^2 for every row d_r of D, against one fixed H.

    With H = L L^T (Cholesky, in float64), D H D^T has diagonal ||D L||^2 per row, and D L is computed
    one column block of L at a time, skipping L's zero upper triangle: about half the multiply-adds of
    D H. A singular H (fewer tokens than features) falls back to the plain product.
    """

    def __init__(self, h: torch.Tensor, block: int = 192):
        factor, info = torch.linalg.cholesky_ex(h.double())
        self.factor = factor.float() if int(info) == 0 else None
        self.h = h.float()
        self._spans = _spans(h.shape[0], block)

    def row_sums(self, d: torch.Tensor) -> torch.Tensor:
        """float64 [rows]: sum_t (d_r . x_t)^2 for each row d_r of d."""
        d = d.float()
        if self.factor is None:
            return (d @ self.h).mul_(d).sum(dim=1, dtype=torch.float64)
        sums = torch.zeros(d.shape[0], dtype=torch.float64, device=d.device)
        for start, stop in self._spans:
            part = d[:, start:] @ self.factor[start:, start:stop]
            sums += part.square_().sum(dim=1, dtype=torch.float64)
        return sums

    def total(self, d: torch.Tensor) -> float:
        """trace(D H D^T)."""
        return self.row_sums(d).sum().item()


def squared_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """sum((a - b)^2) over all elements, accumulated in float64."""
    return torch.sub(a, b).square_().sum(dtype=torch.float64).item()


def squared_norm(a: torch.Tensor) -> float:
    return a.square().sum(dtype=torch.float64).item()


def cosine_sum(h_in: torch.Tensor, h_out: torch.Tensor) -> float:
    """sum over tokens of cos(h_in, h_out) along the hidden dimension (LIM's numerator)."""
    return F.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum(dtype=torch.float64).item()
