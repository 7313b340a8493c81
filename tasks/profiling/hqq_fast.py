"""HQQ quantize-dequantize for profiling: the same numbers as `tasks.quantize.hqq_ops.quant_dequant`, faster.

HQQ (Badri & Shaji 2023, half-quadratic quantization) with hqq's defaults: asymmetric, groups of
`group_size` along the flattened rows (axis=1), zero rounded at 4 bits, and the legacy proximal solver
(`hqq.core.optimize.optimize_weights_proximal_legacy`: lp_norm 0.7, beta 10, at most 20 iterations,
early stop when the mean absolute error stops falling). The solver only moves the zero point; for each
group it minimizes  |W - (Q - z)/s|_p  by alternating  Q = clamp(round(W s + z)),  W_e = shrink(W - W_r),
z = mean(Q - (W - W_e) s).

Profiling needs this for every matrix at all 12 rungs, which made it the single largest cost. Three
changes, none of which alters a floating-point operation on any element:
- `W * s` is loop-invariant (the legacy solver never changes the scale), so it is computed once;
- the shrinkage sign(d) max(|d| - |d|^(p-1)/beta, 0) is exactly zero for |d| below
  beta^(-1/(2-p)) (about 0.17), which holds for almost every element, so its `pow` runs only on the
  few elements above (padded so that they take the same vectorized path as in hqq);
- a group whose zero no longer moves is a fixed point of the iteration (the same inputs give the same
  bits), so once most groups have settled only the moving ones are recomputed; the error mean still runs
  over every element, with the settled groups' values kept.
The result is bitwise identical to hqq's (tests/test_profiling_hqq.py checks it on heavy-tailed weights).
"""

from __future__ import annotations

import math

import torch

from tasks.errors import PipelineError
from tasks.ladder import Rung

LP_NORM = 0.7
BETA = 10.0
ITERS = 20
# Below this |d| the shrinkage is certainly 0: |d|^(2-p) <= 0.99^(1.3)/beta leaves a 1.3% margin, far
# above float32 rounding, so the skipped elements would have produced an exact (signed) zero.
_ZERO_SHRINK = 0.99 * (1.0 / BETA) ** (1.0 / (2.0 - LP_NORM))
_PAD = 64  # the gathered elements are padded to a multiple of the widest SIMD loop, as in hqq's full pass


def _shrink(d: torch.Tensor) -> torch.Tensor:
    from hqq.core.optimize import shrink_lp_op

    n = d.numel()
    pad = (-n) % _PAD
    if pad:
        d = torch.cat([d, d.new_ones(pad)])
    return shrink_lp_op(d, BETA, LP_NORM)[:n]


@torch.no_grad()
def quant_dequant(weight: torch.Tensor, rung: Rung) -> torch.Tensor:
    """dequant(HQQ_rung(W)) in float32, equal bit for bit to tasks.quantize.hqq_ops.quant_dequant."""
    g = rung.group_size
    if weight.numel() % g:
        raise PipelineError(f"a weight of shape {tuple(weight.shape)} does not split into groups of {g}")
    W = weight.detach().float().reshape(-1, g)
    max_v = float(round(2**rung.bits - 1))

    # hqq.core.quantize.Quantizer.quantize: initial scale (inverted) and zero from the group range.
    w_min, w_max = torch.aminmax(W, dim=1, keepdim=True)  # exact, like hqq's separate min and max
    denom = w_max - w_min
    scale = max_v / denom
    scale = torch.where(denom.abs() <= 1e-4, torch.full_like(scale, 1.0), scale)
    scale = scale.clamp(max=2e4)
    zero = -w_min * scale
    if rung.bits == 4:  # hqq's BaseQuantizeConfig rounds the zero at 4 bits only
        zero = torch.round(zero)

    ws = W * scale  # loop-invariant
    err = torch.empty_like(W)  # |W - W_r| of every element, kept current row by row
    active = None  # rows whose zero still moves (None: all rows)
    best = torch.tensor(math.inf)
    for _ in range(ITERS):
        if active is None:
            w, w_s, s, z = W, ws, scale, zero
        else:
            w, w_s, s, z = W[active], ws[active], scale[active], zero[active]
        q = torch.add(w_s, z).round_().clamp_(0, max_v)
        d = torch.addcdiv(w, q - z, s, value=-1.0).abs_()  # |W - (Q - z)/s|
        if active is None:
            err = d
        else:
            err[active] = d
        error = err.mean()
        big = (d.amax(dim=1) > _ZERO_SHRINK).nonzero().reshape(-1)  # groups where W_e can be non-zero
        if big.numel():
            bs, bz, bw, bq = s[big], z[big], w[big], q[big]
            shrunk = _shrink((bw - (bq - bz) / bs).reshape(-1)).reshape(bw.shape)
        target = q.sub_(w_s)  # Q - (W - W_e) s where W_e == 0
        if big.numel():
            target[big] = bq - (bw - shrunk) * bs
        new = target.mean(dim=1, keepdim=True)
        moved = (new != z).reshape(-1).nonzero().reshape(-1)
        if active is None:
            zero = new
            if moved.numel() < 0.6 * zero.shape[0]:  # gathering pays once most groups have settled
                active = moved
        else:
            zero[active] = new
            active = active[moved]
        if error < best:
            best = error
        else:
            break

    q = torch.empty_like(W)
    torch.add(ws, zero, out=q).round_().clamp_(0, max_v)
    inverse = 1.0 / scale  # hqq stores the inverted scale and dequantizes with a product
    return ((q - zero) * inverse).reshape(weight.shape)
