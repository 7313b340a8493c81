r"""GPTQ backend: Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", through GPTQModel 7.6.

Objective, per linear of each decoder layer in turn: min_Q ||W X - Q X||_2^2 over the calibration
activations X entering it (computed through the already-quantized earlier layers), solved column by
column with inverse-Hessian error feedback (H = 2 X X^T, damped by damp_percent of its mean diagonal).

The bit map becomes one `QuantizeConfig`: the base rung (the rung holding most parameters) sets
bits/group_size, and every other rung is one `dynamic` override keyed by an anchored regex over its
modules, e.g. {"+:^model\.layers\.(?:(?:1)\.self_attn\.q_proj)$": {"bits": 8, "group_size": 128}};
linears the bit map leaves out get "-:" (kept in 16-bit). Output: GPTQ format (int32-packed qweight
and qzeros, fp16 scales, g_idx) in model.safetensors plus quantize_config.json, config and tokenizer.

Group sizes that do not divide in_features (SmolLM2's 576 at g128): GPTQ groups columns by
g_idx = column // group_size, so each row's last group is shorter (576 = 4 x 128 + 64). GPTQModel
quantizes, packs and runs that natively; nothing is substituted, and the bpp is a hair above nominal.

Asymmetric (a zero point per group, as HQQ and AWQ here) by default: on SmolLM2 at b4g64 it gave WikiText-2
ppl 36.3 against 39.7 symmetric. Pass sym=True for GPU runtimes whose fastest kernels (Marlin) need it.

Why GPTQModel and not llm-compressor's GPTQModifier: both run on CPU, but compressed-tensors refuses
group sizes that do not divide the columns (SmolLM2 would need g64 for 6 of 7 modules at "g128"),
GPTQModel's per-module `dynamic` is exactly the bit map's shape, and it quantizes SmolLM2 in about
2.5 minutes on 2 shared CPU cores. The mixed-precision checkpoint loads in GPTQModel, vLLM and SGLang;
transformers' own GPTQ loader cannot read `dynamic` yet, hence load() goes through GPTQModel.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import Rung
from tasks.quantize.base import HIDDEN_MODEL_TYPE, Backend, Capabilities, OwnErrors, patched, plain_checkpoint, true_config
from tasks.quantize.registry import option_defaults
from tasks.quantize.gptq_targets import (
    BITMAP_FILE,
    base_rung,
    calibration_rows,
    check_module_keys,
    hf_module_name,
    module_regex,
    resolve_options,
    rung_groups,
    saved_bytes,
    store_unquantized_16bit,
)

if importlib.util.find_spec("gptqmodel") is None:  # the registry turns this into "use its container"
    raise ImportError("the gptq backend needs gptqmodel==7.6.0", name="gptqmodel")

log = logging.getLogger(__name__)

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)


def quantize_config_args(bitmap: BitMap, unquantized: list[str], sym: bool = False, desc_act: bool = False,
                         damp_percent: float = 0.05) -> dict:
    """The bit map as QuantizeConfig keyword arguments: base bits/group_size plus `dynamic` overrides."""
    base = base_rung(bitmap)
    dynamic: dict[str, dict] = {}
    for rung, keys in rung_groups(bitmap).items():
        if rung != base:
            dynamic[f"+:{module_regex(keys)}"] = {"bits": rung.bits, "group_size": rung.group_size}
    if unquantized:
        dynamic[f"-:{module_regex(unquantized)}"] = {}
    return {
        "bits": base.bits,
        "group_size": base.group_size,
        "sym": sym,
        "desc_act": desc_act,
        "damp_percent": damp_percent,
        "dynamic": dynamic or None,
    }


def _default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _small_machine_workers() -> str | None:
    """GPTQModel runs half the cores as workers, one on a 2-core machine: use both there (as measured
    on this project's CI machines); larger machines keep GPTQModel's own default."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return str(cores) if cores <= 3 else None


def _processor_logs_in(directory: str):
    """GPTQModel writes per-run logs to ./logs of the working directory; send them to `directory`
    instead (the same table is saved as quant_log.csv with the model)."""
    from gptqmodel.looper import loop_processor

    return patched(loop_processor, "_PROJECT_LOG_DIR", Path(directory))


class GPTQBackend(Backend):
    name = "gptq"
    capabilities = Capabilities(
        uniform_bits=BITS,
        group_sizes=GROUP_SIZES,
        bitmap="any",
        cpu=True,
        gpu=True,
        needs_calibration=True,
        # GPTQModel saves a quantized Gemma 3 through transformers 5's config validation, which rejects its
        # per-layer-kind rope_parameters (AttributeError in the rope validator): measured in tests/test_families.py.
        refused_families=(("qwen3_moe", "this backend's bit map (GPTQModel's per-module dynamic config) is not wired to experts yet; use hqq"),
                          ("mixtral", "this backend's bit map (GPTQModel's per-module dynamic config) is not wired to experts yet; use hqq"),
                          ("gemma3_text", "GPTQModel cannot save a Gemma 3 checkpoint with transformers 5; use hqq"),
                          ("phi3", "GPTQModel's phi3 module tree names gate_proj and up_proj, which transformers stores as one "
                                   "gate_up_proj, so a bit map would not apply; use hqq")),  # fmt: skip
        fused_kernels=True,
        own_errors=OwnErrors("gptq", "GPTQ", "one GPTQ solve per module input and rung"),  # tasks/profiling/gptq_errors.py
        serving="mlflow pyfunc; GPTQModel (uniform maps)",
        clients=("uniform maps: GPTQModel, and transformers with gptqmodel (on CPU with quantization_config backend 'torch'); "
                 "maps with per-module overrides: GPTQModel through this project's loader only, since transformers drops the "
                 "overrides and its config.json therefore names a model type transformers refuses (for vLLM, which reads "
                 f"`dynamic`, set model_type back from {HIDDEN_MODEL_TYPE!r})"),
        libraries=("gptqmodel",),
    )

    def transformers_misreads(self, checkpoint: Path) -> bool:
        """With per-module overrides (`dynamic`): transformers' GPTQ integration (optimum) drops them."""
        config = json.loads((Path(checkpoint) / "config.json").read_text())
        return bool((config.get("quantization_config") or {}).get("dynamic"))

    def engine_checks(self, out_dir: Path) -> dict[str, str]:
        from tasks.quantize.vllm_rules import gptq_refusals, tensor_shapes, vllm_verdict

        return {"vllm": vllm_verdict(gptq_refusals(true_config(out_dir), tensor_shapes(out_dir)))}

    def quantize(self, model_path: Path, bitmap: BitMap, calibration: torch.Tensor | None, out_dir: Path,
                 options: dict) -> dict:
        from tasks.model_io import linear_param_counts, read_config

        self.check(bitmap)
        opts = resolve_options(self.name, option_defaults(self.name), options)
        rows = calibration_rows(calibration, self.name)
        unquantized = check_module_keys(bitmap, set(linear_param_counts(read_config(model_path))))
        args = quantize_config_args(bitmap, unquantized, opts["sym"], opts["desc_act"], opts["damp_percent"])
        device = opts["device"] or _default_device()

        workers = _small_machine_workers()
        if workers and "GPTQMODEL_CPU_WORKERS" not in os.environ:
            os.environ["GPTQMODEL_CPU_WORKERS"] = workers  # read when gptqmodel is first imported
        from gptqmodel import GPTQModel, QuantizeConfig

        log.info("gptq: base b%dg%d, %d override(s), %d calibration rows of %d tokens, on %s",
                 args["bits"], args["group_size"], len(args["dynamic"] or {}), rows.shape[0], rows.shape[1], device)
        dataset = [{"input_ids": row[None, :], "attention_mask": torch.ones_like(row)[None, :]} for row in rows]
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="gptq-logs-") as logs, _processor_logs_in(logs):
            model = GPTQModel.load(str(model_path), QuantizeConfig(**args), device=device, dtype=torch.float32)
            model.quantize(dataset, batch_size=int(opts["batch_size"]))
        seconds = time.perf_counter() - started
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save(str(out_dir))
        store_unquantized_16bit(out_dir, {hf_module_name(k) for k in bitmap.modules})
        bitmap.save(out_dir / BITMAP_FILE)
        size = saved_bytes(out_dir)
        log.info("gptq: quantized in %.1f s, saved %.2f MiB to %s", seconds, size / 2**20, out_dir)
        return {
            "quant_seconds": seconds,
            "saved_bytes": size,
            "library": f"gptqmodel=={version('gptqmodel')}",
            "base_rung": Rung(args["bits"], args["group_size"]).name,
            "overrides": len(args["dynamic"] or {}),
            "calibration_shape": list(rows.shape),
        }

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        """GPTQModel's torch kernel on CPU (it computes in bf16/fp16 only, so bf16 there), its best kernel
        on GPU in fp16. Logits are cast to float32 for the evaluation's log-softmax."""
        from gptqmodel import BACKEND, GPTQModel

        out_dir = Path(out_dir)
        if not (out_dir / "quantize_config.json").exists():
            raise PipelineError(f"{out_dir} holds no GPTQ model (quantize_config.json is missing)")
        on_cpu = str(device).startswith("cpu")
        with plain_checkpoint(out_dir) as path:  # a registered copy with overrides hides its model type
            wrapped = GPTQModel.load(
                str(path),
                device=device,
                backend=BACKEND.TORCH if on_cpu else BACKEND.AUTO,
                dtype=torch.bfloat16 if on_cpu else torch.float16,
            )
        model = wrapped.model
        model.lm_head.register_forward_hook(lambda _module, _inputs, output: output.float())
        model.eval()
        return model
