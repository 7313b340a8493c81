"""The weight error the GPTQ backend leaves at every rung, from the profiler's input Gram matrix.

GPTQ (tasks/quantize/gptq.py) does not round each weight on its own: it quantizes column by column and
pushes each column's error onto the columns not yet quantized through the inverse Hessian H = X^T X of
the module's calibration inputs. So a module's error, and which modules are hard, differ from HQQ's
(docs/methods.md §11). The profiler already holds H (float64, over every calibration token) for its output
errors; this runs GPTQModel's own per-module solver (`gptqmodel.quantization.gptq.GPTQ`, the code the
backend runs, with the backend's defaults: asymmetric, damp_percent 0.05, no act-order, group-aware
reordering on) on that H at every rung, and returns W - Q. What the backend sees differs in one way:
GPTQModel quantizes layer by layer and feeds each layer the output of the already quantized ones, while
the profiler's inputs are full precision (the same H every other score uses).

The solver's rows are independent given H (one shared inverse Hessian, per-row scales and zeros), so the
modules that share an input (q/k/v; gate/up) are stacked into one matrix: one solve per input and rung.
"""

from __future__ import annotations

import torch
from torch import nn

from tasks.errors import PipelineError
from tasks.ladder import Rung

DAMP_PERCENT = 0.05  # the gptq backend's default damp_percent (tasks.quantize.registry.BACKEND_OPTIONS)


def _solver(weight: torch.Tensor, rung: Rung):
    try:
        from gptqmodel import QuantizeConfig
        from gptqmodel.quantization.gptq import GPTQ
    except ImportError as exc:  # the profile image has it; a custom one may not
        raise PipelineError("the GPTQ rung errors need gptqmodel==7.6.0 (the gptq backend's library) in the profiling environment") from exc
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight
    config = QuantizeConfig(bits=rung.bits, group_size=rung.group_size, sym=False, desc_act=False, damp_percent=DAMP_PERCENT,
                            offload_to_disk=False)  # fmt: skip
    task = GPTQ(linear, config)
    task.fallback, task.expected_nsamples = config.fallback, None  # as GPTQModel's processor sets them
    task.quantizer.configure(perchannel=True)
    return task


@torch.no_grad()
def gptq_rung_errors(weights: dict[str, torch.Tensor], h: torch.Tensor, tokens: int, rungs: tuple[Rung, ...]) -> dict[str, torch.Tensor]:
    """Per module (all sharing the input whose Gram matrix is `h`, over `tokens` tokens): W - GPTQ_rung(W)
    for every rung, stacked along the rows like the HQQ errors: [len(rungs) * out, in], float32."""
    names = list(weights)
    stacked = torch.cat([weights[m].detach().float() for m in names]).contiguous()
    sizes = [weights[m].shape[0] for m in names]
    errors = {m: torch.empty(len(rungs) * n, stacked.shape[1], device=stacked.device) for m, n in zip(names, sizes)}
    for k, rung in enumerate(rungs):
        task = _solver(stacked.clone(), rung)
        task.H, task.nsamples = h.float().clone(), tokens  # GPTQ's solution is the same for any scale of H
        quantized = task.quantize()[0].float()
        start = 0
        for m, n in zip(names, sizes):
            torch.sub(stacked[start : start + n], quantized[start : start + n], out=errors[m][k * n : (k + 1) * n])
            start += n
    return errors
