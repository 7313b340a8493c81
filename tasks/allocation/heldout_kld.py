"""The refinement's fitness (tasks.allocation.refine): the KL divergence to the unquantized model of the
model quantized by a bit map, on held-out calibration windows (the calibration stage's holdout.safetensors:
none of the tokens the profile's scores came from).

The unquantized model is loaded once; a map is applied by swapping each changed linear's weight for its
quantize-dequantize at the map's rung (by the backend's own quantizer: HQQ's, or ggml's with the
importance matrix), cached per (module, rung) up to twice the linears' size (least recently used out
first), so consecutive maps that share most rungs cost only their differences. The base model's distribution is captured once (top 64 and 64 tail samples per token,
as the evaluation's reference; tasks/evaluation/reference.py) and each map costs one forward pass over
the tokens asked for.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from tasks.errors import PipelineError
from tasks.evaluation.perplexity import Protocol, model_forward, score_stream
from tasks.evaluation.reference import TAIL, TOP_K
from tasks.ladder import Rung

log = logging.getLogger(__name__)

Quantizer = Callable[[str, torch.Tensor, Rung], torch.Tensor]  # (module key, weight, rung) -> dequantized weight


def backend_quantizer(backend: str, imatrix: str | Path | None = None, config: dict | None = None, checkpoint: str | Path | None = None,
                      calibration: torch.Tensor | None = None) -> Quantizer:  # fmt: skip
    """The quantize-dequantize a backend applies to one linear, where the refinement can reproduce it:
    hqq, HQQ's own numbers; gguf, ggml's quantizer with the run's importance matrix (read for the modules of
    `config`, the model's config.json); gptq, GPTQModel's solver on each input's Gram matrix over the
    `calibration` windows through the unquantized model at `checkpoint` (full-precision inputs, as the
    profile's GPTQ errors; every Gram matrix is kept, float32: 0.4 GB for SmolLM2)."""
    if backend == "hqq":
        from tasks.profiling.hqq_fast import quant_dequant

        return lambda key, w, rung: quant_dequant(w, rung)
    if backend == "gguf":
        from tasks.ladder import MODULES, module_key
        from tasks.quantize.ggml_quant import ggml_rung_error
        from tasks.quantize.imatrix import module_importance

        layers = int(config["num_hidden_layers"])
        importance = module_importance(imatrix, config["model_type"], layers, [module_key(i, m) for i in range(layers) for m in MODULES]) if imatrix else {}
        return lambda key, w, rung: w - ggml_rung_error(w, rung, importance.get(key))
    if backend == "gptq" and checkpoint is not None and calibration is not None:
        from tasks.profiling.gptq_errors import gptq_rung_errors

        grams, tokens = input_grams(checkpoint, calibration)
        return lambda key, w, rung: w - gptq_rung_errors({key: w}, grams[_input_of(key)].double(), tokens, (rung,))[key]
    raise PipelineError(f"optimal option refine: the {backend} backend's quantizer is not reproduced layer by layer here (hqq, gguf and gptq are); "
                        "drop refine for it")  # fmt: skip


# The linear whose input each module shares (q/k/v one Gram matrix, gate/up another).
_SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}


def _input_of(key: str) -> str:
    layer, module = key.split(".", 1)
    return f"{layer}.{_SHARED_INPUT.get(module, module)}"


@torch.no_grad()
def input_grams(checkpoint: str | Path, windows: torch.Tensor) -> tuple[dict[str, torch.Tensor], int]:
    """Per module input (`_input_of`), X^T X over every token of `windows` through the unquantized model
    (float64 sums, kept float32), and the token count."""
    from tasks.model_io import load_model, quantizable_linears

    model = load_model(checkpoint)
    grams: dict[str, torch.Tensor] = {}

    def hook(key):
        def keep(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            grams[key] = grams[key] + x.T @ x if key in grams else x.T @ x

        return keep

    handles = [m.register_forward_pre_hook(hook(k)) for k, m in quantizable_linears(model).items() if _input_of(k) == k]
    try:
        for start in range(0, len(windows), 4):
            model(input_ids=windows[start : start + 4], use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return {k: g.float() for k, g in grams.items()}, int(windows.numel())


class HeldoutKld:
    """fitness(modules: {key: Rung}, tokens) -> the mean per-token KLD on the first `tokens` held-out tokens."""

    def __init__(self, checkpoint: str | Path, holdout: torch.Tensor, quantize: Quantizer, max_tokens: int, device: str = "cpu"):
        from tasks.model_io import load_model, quantizable_linears

        if holdout.ndim != 2 or not len(holdout):
            raise PipelineError("optimal option refine: the calibration set has no held-out windows (its text is all calibration windows)")
        seq_len = holdout.shape[1]
        self.protocol = Protocol("holdout", max_length=seq_len, stride=seq_len)  # independent windows, each scored whole
        windows = min(len(holdout), math.ceil(max_tokens / (seq_len - 1)))
        if windows * (seq_len - 1) < max_tokens:
            log.warning("refine: %d held-out tokens asked for, the calibration set holds %d", max_tokens, windows * (seq_len - 1))
        self.ids = holdout[:windows].reshape(-1).to(device)
        self.model = load_model(checkpoint).to(device)
        self.linears = quantizable_linears(self.model)
        self.original = {k: m.weight.detach().clone() for k, m in self.linears.items()}
        self.quantize, self.applied = quantize, {}
        self.cache: OrderedDict = OrderedDict()
        self.cache_bytes, self.cache_limit = 0, 2 * sum(w.numel() * w.element_size() for w in self.original.values())
        self.reference = score_stream(model_forward(self.model), self.ids, self.protocol, capture_top_k=TOP_K, capture_tail=TAIL).captured

    @property
    def tokens(self) -> int:
        return self.reference.tokens

    def __call__(self, modules: dict[str, Rung], tokens: int) -> float:
        self._apply(modules)
        windows = max(1, min(self.tokens, tokens) // (self.protocol.max_length - 1))
        ids = self.ids[: windows * self.protocol.max_length]
        scores = score_stream(model_forward(self.model), ids, self.protocol, reference=self.reference.rows(slice(0, windows * (self.protocol.max_length - 1))))
        return float(np.mean(scores.kld))

    @torch.no_grad()
    def _apply(self, modules: dict[str, Rung]) -> None:
        unknown = sorted(set(modules) - set(self.linears))
        if unknown:
            raise PipelineError(f"optimal option refine: the model has no linear {unknown[0]} (a family whose linears are stacked or experts?)")
        for key, rung in modules.items():
            if self.applied.get(key) == rung:
                continue
            self.linears[key].weight.copy_(self._weight(key, rung))
            self.applied[key] = rung

    def _weight(self, key: str, rung: Rung) -> torch.Tensor:
        if (key, rung) in self.cache:
            self.cache.move_to_end((key, rung))
            return self.cache[key, rung]
        weight = self.quantize(key, self.original[key], rung).to(self.original[key].dtype)
        self.cache[key, rung] = weight
        self.cache_bytes += weight.numel() * weight.element_size()
        while self.cache_bytes > self.cache_limit and len(self.cache) > 1:
            _, old = self.cache.popitem(last=False)
            self.cache_bytes -= old.numel() * old.element_size()
        return weight
