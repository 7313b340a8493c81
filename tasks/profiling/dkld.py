"""ExLlamaV3's measurement (docs/methods.md §10): the model-output KLD each layer group gains or loses when
it alone moves from a base rung to a candidate rung, with the rest of the model quantized at the base.

As `exllamav3/conversion/measure_model.py` does: every linear is quantized at the base rung (the cheapest
candidate); the base model's output KLD against the unquantized model is measured once; then for each
group (the attention linears or the MLP linears of one decoder layer) and each other candidate rung, the
group alone is re-quantized at that rung and the KLD measured again; `dkld` = that KLD minus the base
KLD (negative where more bits help). Only the layers from the group's onward are re-run: the base model's
input to every decoder layer is kept from one pass.

Quantization is HQQ's (tasks.profiling.hqq_fast), as in the rest of the profile. Unlike the streaming
profiler this holds the whole model (float32) and, for the measured windows, the reference log-probs
[tokens, vocab] in memory: it is meant for the few calibration windows ExLlamaV3 uses (its default is 10
rows), and it is opt-in. Cost: groups x (candidates - 1) forwards of half the model on average.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from tasks.families import layout_for
from tasks.ladder import Rung
from tasks.profiling import hqq_fast

log = logging.getLogger(__name__)

DEFAULT_WINDOWS = 2  # of the calibration windows: each candidate costs half a forward over them on average
# The candidates measured by default: the base b3g128 and the 3- to 8-bit steps a budget between 3.13 and
# about 4.5 bpp can reach (each further rung costs another pass per group).
DEFAULT_RUNGS = (Rung(3, 128), Rung(3, 64), Rung(4, 128), Rung(4, 64), Rung(8, 128))


def group_of(module: str) -> str:
    """The layer group of a logical module: 'attn' (the attention linears) or 'mlp' (the MLP's, or every expert's)."""
    return "attn" if module.startswith("self_attn.") else "mlp"


def output_kld(logits: torch.Tensor, ref_logprobs: torch.Tensor) -> float:
    """Mean over tokens of KL(ref || model), in nats."""
    logprobs = F.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    return float((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(dim=-1).mean())


@torch.no_grad()
def measure_dkld(model_path, ids: torch.Tensor, rungs: tuple[Rung, ...]) -> dict[tuple[int, str, Rung], float]:
    """{(layer, group, rung): dKLD} for every decoder layer, group ('attn', 'mlp') and rung; the base
    (cheapest) rung's entries are 0. `ids`: [windows, seq_len] token ids."""
    from tasks.model_io import load_model

    rungs = tuple(sorted(rungs, key=lambda r: r.bpp))
    base = rungs[0]
    started = time.perf_counter()
    from tasks.experts import unstack_experts

    model = load_model(model_path)
    unstack_experts(model)  # MoE: one linear per expert, as the layout names them
    layout = layout_for(model.config)
    groups = {g: tuple(m for m in layout.modules if group_of(m) == g) for g in ("attn", "mlp")}
    layers = model.model.layers
    ref_logprobs = F.log_softmax(model(ids, use_cache=False).logits.float().reshape(-1, model.config.vocab_size), dim=-1)

    # Every stored linear at the base rung; keep each logical module's original weight to re-quantize.
    originals: dict[tuple[int, str], torch.Tensor] = {}
    for i, layer in enumerate(layers):
        for module, w in layer_weights(layer, layout).items():
            originals[(i, module)] = w.clone()
        assign_weights(layer, layout, {m: hqq_fast.quant_dequant(originals[(i, m)], base) for m in layout.modules})

    # The base model's input to every decoder layer (and that layer's mask and rotary tables), and its KLD.
    logits, entry = forward_with_layer_inputs(model, ids)
    base_kld = output_kld(logits, ref_logprobs)
    log.info("dkld: base %s, KLD %.4f over %d tokens", base.name, base_kld, ids.numel())

    result: dict[tuple[int, str, Rung], float] = {}
    for i in range(len(layers)):
        for group, members in groups.items():
            result[(i, group, base)] = 0.0
            base_weights = {m: w.clone() for m, w in layer_weights(layers[i], layout).items() if m in members}  # as assigned above
            for rung in rungs[1:]:
                assign_weights(layers[i], layout, {m: hqq_fast.quant_dequant(originals[(i, m)], rung) for m in members})
                result[(i, group, rung)] = output_kld(run_from(model, i, entry), ref_logprobs) - base_kld
            assign_weights(layers[i], layout, base_weights)
        log.info("dkld: layer %d/%d measured (%.0f s)", i + 1, len(layers), time.perf_counter() - started)
    return result


def layer_weights(layer, layout) -> dict[str, torch.Tensor]:
    """Logical module -> its weight in the layer (a view of the stored linear's rows)."""
    return layout.weights({f"{name}.weight": layer.get_submodule(name).weight.data for name in layout.linears})


def assign_weights(layer, layout, weights: dict[str, torch.Tensor]) -> None:
    """Write logical modules' weights into the layer's stored linears (Phi-3: rows of qkv_proj)."""
    for module, w in weights.items():
        rows = layout.rows[module]
        layer.get_submodule(rows.name).weight.data[rows.start : rows.stop] = w


def forward_with_layer_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The model's logits and, per decoder layer, its input and keyword arguments (masks and rotary tables
    per layer kind), so that `run_from` can re-run the model from any layer."""
    entry: list = [None] * len(model.model.layers)

    def keep(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            entry[index] = (hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"})

        return hook

    handles = [layer.register_forward_pre_hook(keep(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    try:
        logits = model(ids, use_cache=False).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, entry


def run_from(model, index: int, entry: list) -> torch.Tensor:
    """The logits of the model from decoder layer `index` on, given that layer's recorded input and each
    layer's recorded keyword arguments (masks and rotary tables per layer kind)."""
    hidden = entry[index][0]
    for i in range(index, len(model.model.layers)):
        out = model.model.layers[i](hidden, **entry[i][1])
        hidden = out[0] if isinstance(out, tuple) else out
    logits = model.lm_head(model.model.norm(hidden))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits
