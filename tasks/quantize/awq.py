"""AWQ backend: Lin et al. 2024, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", through llm-compressor 0.14 (the maintained successor of AutoAWQ).

Objective, per smoothing group (a norm or linear and the linears reading its output): choose per-input-
channel scales s = mean|x|^r / mean|w|^(1-r) (duo scaling; a grid of about n_grid ratios r in [0, 1]) minimizing
||f(W X) - f(Q(W diag(s)) diag(s)^-1 X)||^2 on the calibration activations, fold 1/s into the preceding
op, then round-to-nearest each linear with its own scheme (asymmetric int, one scale and zero per group).

The bit map becomes `config_groups` of a QuantizationModifier that runs after the AWQ transform: one
group per rung whose `re:` target is an anchored regex over exactly that rung's modules (targets are
disjoint, so no precedence rules matter and reload rebuilds the same scheme per module). Saved with
`save_compressed` (compressed-tensors "pack-quantized": int32-packed weights, scales, zero points) as
safetensors; transformers reloads it (decompressing to dense float on CPU).

Group sizes that do not divide in_features: compressed-tensors cannot store a ragged last group, so
such a module gets the largest power-of-two divisor of the requested group size that divides its
columns (SmolLM2 at g128: 576 -> g64 for q/k/v/o/gate/up, down_proj 1536 stays g128). That costs a few
more bits, never fewer; every change is logged and returned as `group_size_changes`. With the option
indivisible_groups="error" it is refused instead.

On CPU, llm-compressor pins cached activations for host-to-device copies that do not exist there
("Cannot access accelerator device"): pinning is disabled for the duration of the run.
"""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import Rung
from tasks.quantize.base import Backend, Capabilities, patched, true_config
from tasks.quantize.registry import option_defaults
from tasks.quantize.gptq_targets import (
    BITMAP_FILE,
    calibration_rows,
    check_module_keys,
    copy_tokenizer,
    hf_module_name,
    module_regex,
    resolve_options,
    rung_groups,
    saved_bytes,
    store_unquantized_16bit,
)

for _package in ("llmcompressor", "compressed_tensors", "datasets"):
    if importlib.util.find_spec(_package) is None:  # the registry turns this into "use its container"
        raise ImportError(f"the awq backend needs {_package} (llmcompressor==0.14.0.1)", name=_package)

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)


def fitting_group_size(in_features: int, group_size: int) -> int:
    """The largest power-of-two divisor of `group_size` that divides `in_features` (576, 128 -> 64)."""
    size = group_size
    while size > 1 and in_features % size:
        size //= 2
    return size


def effective_rungs(
    bitmap: BitMap, in_features: dict[str, int], indivisible: str = "finer"
) -> tuple[dict[str, Rung], dict[str, list[int]]]:
    """Per module, the rung compressed-tensors can store; and {key: [asked, used]} where they differ."""
    rungs: dict[str, Rung] = {}
    changes: dict[str, list[int]] = {}
    for key, rung in bitmap.modules.items():
        size = fitting_group_size(in_features[key], rung.group_size)
        if size != rung.group_size:
            if indivisible == "error":
                raise PipelineError(
                    f"awq cannot use group size {rung.group_size} for {key} ({in_features[key]} input features"
                    f" are not a multiple): use g{size}, or indivisible_groups='finer' to substitute it automatically"
                )
            changes[key] = [rung.group_size, size]
        rungs[key] = Rung(rung.bits, size)
    return rungs, changes


def config_groups(rungs: dict[str, Rung], symmetric: bool = False) -> dict[str, dict]:
    """compressed-tensors config_groups: one group per rung, targeting exactly its modules."""
    as_bitmap = BitMap(method="effective", modules=rungs, params={k: 1 for k in rungs})
    return {
        f"group_{rung.name}": {
            "targets": [f"re:{module_regex(keys)}"],
            "weights": {
                "num_bits": rung.bits,
                "type": "int",
                "symmetric": symmetric,
                "strategy": "group",
                "group_size": rung.group_size,
            },
        }
        for rung, keys in rung_groups(as_bitmap).items()
    }


def _no_pinned_memory():
    """llm-compressor's IntermediatesCache.pin_memory as a no-op while AWQ runs (CPU has nothing to pin for)."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    return patched(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None)


class AWQBackend(Backend):
    name = "awq"
    capabilities = Capabilities(
        uniform_bits=BITS,
        group_sizes=GROUP_SIZES,
        bitmap="any",
        cpu=True,
        gpu=True,
        needs_calibration=True,
        refused_families=(("qwen3_moe", "this backend's bit map (llm-compressor's per-module AWQ recipe) is not wired to experts yet; use hqq"),
                          ("mixtral", "this backend's bit map (llm-compressor's per-module AWQ recipe) is not wired to experts yet; use hqq"),
                          ("phi3", "llm-compressor's AWQ mappings name q/k/v and gate/up separately, which Phi-3 stacks in qkv_proj and gate_up_proj; use hqq"),),
        fused_kernels=True,
        serving="mlflow transformers; compressed-tensors",
        clients="transformers with compressed-tensors installed, vLLM (compressed-tensors config groups)",
        libraries=("compressed-tensors",),
    )

    def transformers_runs(self, checkpoint: Path) -> bool:
        return True  # compressed-tensors config groups

    def engine_checks(self, out_dir: Path) -> dict[str, str]:
        from tasks.quantize.vllm_rules import compressed_tensors_refusals, tensor_shapes, vllm_verdict

        return {"vllm": vllm_verdict(compressed_tensors_refusals(true_config(out_dir), tensor_shapes(out_dir)))}

    def quantize(self, model_path: Path, bitmap: BitMap, calibration: torch.Tensor | None, out_dir: Path,
                 options: dict) -> dict:
        from tasks.model_io import load_model, quantizable_linears

        self.check(bitmap)
        opts = resolve_options(self.name, option_defaults(self.name), options)
        if opts["indivisible_groups"] not in ("finer", "error"):
            raise PipelineError(
                f"awq option indivisible_groups must be 'finer' or 'error', not {opts['indivisible_groups']!r}"
            )
        rows = calibration_rows(calibration, self.name)

        model = load_model(model_path)
        linears = quantizable_linears(model)
        check_module_keys(bitmap, set(linears))
        in_features = {k: lin.in_features for k, lin in linears.items()}
        rungs, changes = effective_rungs(bitmap, in_features, opts["indivisible_groups"])
        if changes:
            kinds = Counter(f"{in_features[k]} inputs: g{asked}->g{used}" for k, (asked, used) in changes.items())
            log.warning(
                "awq: %d module(s) have input features that are not a multiple of their group size, using finer"
                " groups (%s)", len(changes), ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items())),
            )
        groups = config_groups(rungs, bool(opts["symmetric"]))
        device = opts["device"] or ("cuda:0" if torch.cuda.is_available() else "cpu")
        if device != "cpu":
            model.to(device)

        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier
        from transformers import AutoTokenizer

        try:  # llm-compressor insists on a processor whenever it gets a dataset, even a tokenized one
            processor = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        except (OSError, ValueError):
            raise PipelineError(f"awq needs the checkpoint's tokenizer, and {model_path} has none") from None
        recipe = [
            AWQModifier(duo_scaling=opts["duo_scaling"], n_grid=int(opts["n_grid"])),
            QuantizationModifier(config_groups=groups, ignore=["lm_head"]),
        ]
        dataset = Dataset.from_dict({"input_ids": rows.tolist(), "attention_mask": torch.ones_like(rows).tolist()})
        log.info("awq: %d rung group(s), %d group-size change(s), %d calibration rows of %d tokens, on %s",
                 len(groups), len(changes), rows.shape[0], rows.shape[1], device)
        started = time.perf_counter()
        with _no_pinned_memory() if device == "cpu" else nullcontext():
            oneshot(
                model=model,
                processor=processor,
                dataset=dataset,
                recipe=recipe,
                max_seq_length=int(rows.shape[1]),
                num_calibration_samples=int(rows.shape[0]),
                shuffle_calibration_samples=False,
            )
        seconds = time.perf_counter() - started

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # llm-compressor's offload bookkeeping; the model is in memory
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            model.save_pretrained(out_dir, save_compressed=True, safe_serialization=True)
        store_unquantized_16bit(out_dir, {hf_module_name(k) for k in bitmap.modules})
        copy_tokenizer(model_path, out_dir)
        bitmap.save(out_dir / BITMAP_FILE)
        size = saved_bytes(out_dir)
        log.info("awq: quantized in %.1f s, saved %.2f MiB to %s", seconds, size / 2**20, out_dir)
        return {
            "quant_seconds": seconds,
            "saved_bytes": size,
            "library": f"llmcompressor=={version('llmcompressor')}",
            "config_groups": {name: g["weights"]["num_bits"] for name, g in groups.items()},
            "group_size_changes": changes,
            "calibration_shape": list(rows.shape),
        }

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        """transformers' compressed-tensors loader; on CPU the packed weights are decompressed to float32."""
        from transformers import AutoModelForCausalLM

        out_dir = Path(out_dir)
        config = out_dir / "config.json"
        if not config.exists() or "compressed-tensors" not in config.read_text():
            raise PipelineError(f"{out_dir} holds no compressed-tensors (AWQ) model")
        model = AutoModelForCausalLM.from_pretrained(
            out_dir, dtype=torch.float32, device_map=device, use_safetensors=True, trust_remote_code=False
        )
        model.eval()
        return model

