"""HQQ backend with hqq's own API: every module of the bit map gets its own rung.

transformers' HqqConfig is broken on transformers 5, so each linear is swapped for an `HQQLinear`
directly. The saved model is one safetensors file: HQQLinear's safetensors-encoded state (packed
weights, scales, zeros, quant config) for the quantized linears and 16-bit copies of everything else
(embeddings, norms, lm_head stay in 16-bit, docs/methods.md §1; an MoE router stays in 32-bit), plus the
config and the bit map. Mixture-of-experts layers are unstacked first (tasks.experts), so every expert's
gate, up and down projection is an HQQLinear of its own, saved under the hub's per-expert names.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.experts import unstack_experts
from tasks.families import layout_for
from tasks.ladder import Rung, split_key
from tasks.quantize.base import Backend, Capabilities, true_config
from tasks.quantize.hqq_ops import hqq_config, hqq_linear

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
BITMAP = "bitmap.json"
STORAGE_DTYPE = torch.float16  # for the unquantized tensors


def stored_rungs(bitmap: BitMap, config) -> dict[str, Rung]:
    """The model's stored linears (full names) -> their rungs: one per logical module, or, where the family
    stacks modules in one linear (Phi-3's qkv_proj), the one rung its members share (tasks.families)."""
    layout = layout_for(config)
    layers = sorted({split_key(key)[0] for key in bitmap.modules})
    unknown = [k for k in bitmap.modules if split_key(k)[1] not in layout.rows]
    if unknown:
        raise PipelineError(f"bit map names module {unknown[0]!r}, which the model does not have")
    out = {}
    for layer in layers:
        for name in layout.linears:
            rung = layout.rung_of(name, layer, bitmap.modules)
            if rung is not None:
                out[f"model.layers.{layer}.{name}"] = rung
    return out


class HQQBackend(Backend):
    name = "hqq"
    capabilities = Capabilities(
        uniform_bits=(2, 3, 4, 8),
        group_sizes=(32, 64, 128),
        bitmap="any",
        cpu=True,
        gpu=True,
        needs_calibration=False,
        serving="mlflow pyfunc",
        clients="this project's loader only (no standard loader reads a mixed-precision HQQ model; transformers refuses it)",
        libraries=("hqq",),
    )

    def transformers_misreads(self, checkpoint: Path) -> bool:
        return True  # it would return random weights

    def quantize(self, model_path: Path, bitmap: BitMap, calibration, out_dir: Path, options: dict) -> dict:
        from tasks.model_io import load_model

        self.check(bitmap)
        model = load_model(model_path)
        unstack_experts(model)  # MoE: one linear per expert, each quantized at its own rung
        targets = stored_rungs(bitmap, model.config)
        started = time.perf_counter()
        for i, (name, rung) in enumerate(targets.items()):
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise PipelineError(f"bit map names module {name!r}, which the model does not have") from None
            model.set_submodule(name, hqq_linear(linear, rung))
            if (i + 1) % 50 == 0 or i + 1 == len(targets):
                log.info("hqq: quantized %d/%d linears", i + 1, len(targets))
        seconds = time.perf_counter() - started
        self._save(model, bitmap, out_dir)
        return {"quant_seconds": seconds}

    def _save(self, model: nn.Module, bitmap: BitMap, out_dir: Path) -> None:
        from safetensors.torch import save_file

        state = {}
        for key, value in model.state_dict().items():
            if isinstance(value, torch.Tensor):
                if value.is_floating_point() and ".self_attn." not in key and ".mlp." not in key:
                    value = value.to(STORAGE_DTYPE)
                state[key] = value.contiguous()
        # Tied embeddings share storage: save the tensor once (safetensors refuses shared memory).
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        save_file(state, str(out_dir / WEIGHTS), metadata={"format": "pt", "quantizer": "hqq"})
        model.config.save_pretrained(out_dir)
        bitmap.save(out_dir / BITMAP)

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM

        out_dir = Path(out_dir)
        bitmap = BitMap.load(out_dir / BITMAP)
        config = AutoConfig.for_model(**true_config(out_dir))  # a registered copy hides its model type
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        unstack_experts(model)
        from hqq.core.quantize import HQQLinear

        for name, rung in stored_rungs(bitmap, config).items():
            layer = HQQLinear(None, hqq_config(rung), compute_dtype=torch.float32, device=device, initialize=False)
            model.set_submodule(name, layer)
        state = load_file(str(out_dir / WEIGHTS))
        state = {k: (v.float() if v.dtype == STORAGE_DTYPE else v) for k, v in state.items()}
        model.load_state_dict(state, strict=False, assign=True)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
        if leftover:
            # Buffers that are computed, not stored (rotary inv_freq), are rebuilt from the config.
            _materialize_buffers(model, config, leftover)
        model.eval()
        return model


def _materialize_buffers(model: nn.Module, config, leftover: list[str]) -> None:
    """Re-create non-persistent buffers (e.g. rotary inv_freq) left on the meta device."""
    params = [n for n in leftover if n in dict(model.named_parameters())]
    if params:
        raise PipelineError(f"saved quantized model is missing tensors: {params[:5]}")
    for name, module in model.named_modules():
        meta = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta:
            continue
        if "rotary" in type(module).__name__.lower():  # inv_freq (Gemma 3: one per layer kind), from the config
            fresh = type(module)(config=config)
            for buffer in meta:
                setattr(module, buffer, getattr(fresh, buffer))
        elif meta == ["embed_scale"] and hasattr(module, "scalar_embed_scale"):  # Gemma: sqrt(hidden)
            module.embed_scale = torch.tensor(module.scalar_embed_scale)
        else:
            raise PipelineError(f"cannot rebuild the computed buffers {meta} of {name or 'the model'} ({type(module).__name__})")
