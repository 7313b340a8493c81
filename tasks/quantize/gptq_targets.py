"""Bit map -> module-name targets, shared by the library backends (GPTQ, AWQ, bitsandbytes).

GPTQModel (`dynamic` overrides), llm-compressor (`config_groups` with `re:` targets) and transformers'
bitsandbytes integration (`llm_int8_skip_modules`) all address modules by their Hugging Face names
("model.layers.1.self_attn.q_proj"). These pure functions turn the bit map's keys ("1.self_attn.q_proj")
into those names, group them by rung and compress each group into one anchored regex, so a 210-module
bit map becomes a handful of readable patterns in the saved quantization config.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import torch

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import Rung, split_key

BITMAP_FILE = "bitmap.json"
STORAGE_DTYPE = torch.float16  # the unquantized tensors on disk (docs/methods.md §1: they stay 16-bit)
_OWNER = re.compile(r"^(model\.layers\.\d+\.[A-Za-z_]+\.[A-Za-z_0-9]+)\.")


def hf_module_name(key: str) -> str:
    """'1.self_attn.q_proj' -> 'model.layers.1.self_attn.q_proj' (Llama-style decoders, docs/methods.md §1)."""
    layer, module = split_key(key)
    return f"model.layers.{layer}.{module}"


def rung_groups(bitmap: BitMap) -> dict[Rung, list[str]]:
    """Module keys per rung, rungs cheapest first, keys in bit-map order."""
    groups: dict[Rung, list[str]] = defaultdict(list)
    for key, rung in bitmap.modules.items():
        groups[rung].append(key)
    return dict(sorted(groups.items(), key=lambda item: (item[0].bits, -item[0].group_size)))


def base_rung(bitmap: BitMap) -> Rung:
    """The rung holding the most parameters: the one a backend sets globally, the others override it.
    Ties go to the cheaper rung, so a boost map's base is its budget rung."""
    weight: dict[Rung, int] = defaultdict(int)
    for key, rung in bitmap.modules.items():
        weight[rung] += bitmap.params.get(key, 1)
    if not weight:
        raise PipelineError("the bit map has no modules to quantize")
    return max(weight, key=lambda r: (weight[r], -r.bpp))


def module_regex(keys: list[str]) -> str:
    """One anchored regex matching exactly the HF names of `keys` and nothing else.

    Keys are grouped by module so the pattern stays short:
    ^model\\.layers\\.(?:(?:1|7)\\.self_attn\\.q_proj|(?:3)\\.mlp\\.down_proj)$
    """
    if not keys:
        raise ValueError("module_regex needs at least one key")
    layers_by_module: dict[str, list[int]] = defaultdict(list)
    for key in keys:
        layer, module = split_key(key)
        layers_by_module[module].append(layer)
    parts = [
        f"(?:{'|'.join(str(i) for i in sorted(set(layers)))})\\.{re.escape(module)}"
        for module, layers in sorted(layers_by_module.items())
    ]
    return rf"^model\.layers\.(?:{'|'.join(parts)})$"


def check_module_keys(bitmap: BitMap, model_keys: set[str]) -> list[str]:
    """Raise if the bit map names modules the model lacks; return the model's linears it leaves out
    (those stay in 16-bit, as in the HQQ backend)."""
    unknown = sorted(set(bitmap.modules) - model_keys)
    if unknown:
        raise PipelineError(
            f"bit map names {len(unknown)} module(s) the model does not have, e.g. {unknown[0]!r}"
        )
    return sorted(model_keys - set(bitmap.modules))


def resolve_options(backend: str, defaults: dict, options: dict | None) -> dict:
    """Backend options over their defaults; an unknown name is a user error, not a silent no-op."""
    unknown = sorted(set(options or {}) - set(defaults))
    if unknown:
        raise PipelineError(f"unknown {backend} option(s) {unknown}: known are {sorted(defaults)}")
    return {**defaults, **(options or {})}


def calibration_rows(calibration: torch.Tensor | None, backend: str) -> torch.Tensor:
    """Validate calibration input_ids: int64 [samples, seq_len] with at least one sample."""
    if calibration is None:
        raise PipelineError(f"the {backend} backend needs calibration data (input_ids [samples, seq_len])")
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2 or calibration.shape[0] == 0:
        shape = tuple(calibration.shape) if isinstance(calibration, torch.Tensor) else type(calibration).__name__
        raise PipelineError(f"calibration must be input_ids [samples, seq_len], got {shape}")
    if calibration.dtype != torch.int64:
        raise PipelineError(f"calibration input_ids must be int64, got {calibration.dtype}")
    return calibration


def saved_bytes(out_dir: Path) -> int:
    """Bytes of the saved weights (*.safetensors), the measured size docs/methods.md §2 asks for."""
    return sum(p.stat().st_size for p in Path(out_dir).glob("*.safetensors"))


def copy_tokenizer(model_path: Path, out_dir: Path) -> None:
    """Save the base model's tokenizer next to the quantized weights, when it has one."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
    except (OSError, ValueError):
        return
    tokenizer.save_pretrained(out_dir)


def store_unquantized_16bit(out_dir: Path, quantized: set[str]) -> int:
    """Rewrite the saved float32 tensors of modules that were not quantized (embeddings, norms, lm_head)
    as float16, as the HQQ backend stores them, so saved sizes compare like for like. Tensors of the
    quantized modules (packed weights, scales, bnb absmax/quant_map, int8 row scales) are left exactly
    as the library wrote them. Returns the number of tensors rewritten."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    rewritten = 0
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            metadata = fh.metadata() or {}
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
        changed = 0
        for name, tensor in tensors.items():
            owner = _OWNER.match(name)
            if tensor.dtype == torch.float32 and not (owner and owner.group(1) in quantized):
                tensors[name] = tensor.to(STORAGE_DTYPE)
                changed += 1
        if changed:
            tmp = path.with_name(f".{path.name}.tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            tmp.replace(path)
            rewritten += changed
    return rewritten
