"""bitsandbytes backend: data-free round-to-nearest with bitsandbytes 0.50 through transformers.

- 4-bit: Dettmers et al. 2023, "QLoRA": NF4 (or FP4) codes, one absmax scale per block of 64 weights
  of the flattened matrix (bnb's blocksize, the bit map's g64), optionally double-quantized scales.
- 8-bit: Dettmers et al. 2022, "LLM.int8()": int8 with one absmax scale per output row, and input
  columns with outliers above `int8_threshold` computed in 16-bit (mixed-precision decomposition).

A uniform bit map is one BitsAndBytesConfig (nf4/fp4 for b4g64, int8 for 8-bit). A layer-sensitive
map is two-level: every 4-bit module (b4g64) is Linear4bit, every module the map boosts to 8 bits is
Linear8bitLt: transformers loads the model in 4-bit with the boosted modules skipped, and those are then
quantized to int8 in place. 8-bit rungs' group sizes are not honoured: LLM.int8 scales per row, which
is coarser than any group. Everything else (2/3-bit, 4-bit at g32/g128) is refused by check().

Saved with save_pretrained (safetensors) plus bnb_layout.json naming the int8 modules: transformers
reloads the 4-bit part by itself, and load() puts the saved int8 weights and row scales back into
Linear8bitLt modules (transformers alone would load them as plain int8 tensors into float linears).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.quantize.base import Backend, Capabilities
from tasks.quantize.registry import option_defaults
from tasks.quantize.gptq_targets import (
    BITMAP_FILE,
    check_module_keys,
    copy_tokenizer,
    hf_module_name,
    resolve_options,
    saved_bytes,
    store_unquantized_16bit,
)

if importlib.util.find_spec("bitsandbytes") is None:  # the registry turns this into "use its container"
    raise ImportError("the bnb backend needs bitsandbytes==0.50.2", name="bitsandbytes")

log = logging.getLogger(__name__)

LAYOUT_FILE = "bnb_layout.json"
BLOCKSIZE = 64  # bnb's 4-bit block size through transformers (not configurable there)
QUANT_TYPES = ("nf4", "fp4")
# bnb logs on int8 matmuls that float32 inputs are cast to float16; that cast is by design.
_INT8_CAST_NOTICE = "MatMul8bitLt: inputs will be cast from"


def plan(bitmap: BitMap) -> dict:
    """Which modules go to 4-bit and which to int8; raise PipelineError for what bnb cannot express."""
    if not bitmap.modules:
        raise PipelineError("the bit map has no modules to quantize")
    bits = {r.bits for r in bitmap.modules.values()}
    if not bits <= {4, 8}:
        odd = sorted({r.name for r in bitmap.modules.values() if r.bits not in (4, 8)})
        raise PipelineError(
            f"bnb cannot express rungs {odd}: it has 4-bit (nf4/fp4, blocksize {BLOCKSIZE} = b4g{BLOCKSIZE})"
            " and 8-bit (LLM.int8, row-wise) only"
        )
    wrong_group = sorted({r.name for r in bitmap.modules.values() if r.bits == 4 and r.group_size != BLOCKSIZE})
    if wrong_group:
        raise PipelineError(
            f"bnb cannot express rungs {wrong_group}: its 4-bit blocksize is {BLOCKSIZE}, so 4-bit modules must be"
            f" b4g{BLOCKSIZE}; 8-bit modules may take any rung (row-wise scales)"
        )
    int8 = [k for k, r in bitmap.modules.items() if r.bits == 8]
    four = [k for k, r in bitmap.modules.items() if r.bits == 4]
    return {"mode": "int8" if not four else "4bit", "int8": int8, "four": four}


def _bnb_config(mode: str, skip: list[str], opts: dict):
    from transformers import BitsAndBytesConfig

    if mode == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=float(opts["int8_threshold"]), llm_int8_skip_modules=skip
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=opts["quant_type"],
        bnb_4bit_use_double_quant=bool(opts["double_quant"]),
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_threshold=float(opts["int8_threshold"]),
        llm_int8_skip_modules=skip,
    )


def _int8_linear(linear: nn.Linear, threshold: float, weight: torch.Tensor | None = None,
                 row_scales: torch.Tensor | None = None) -> nn.Module:
    """A Linear8bitLt from a float linear (quantized here) or from saved int8 weights and row scales."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(
        linear.in_features, linear.out_features, bias=linear.bias is not None,
        has_fp16_weights=False, threshold=threshold, device="meta",
    )
    if weight is None:  # Int8Params quantizes (row-wise absmax) when a float CPU tensor is moved .to() a device
        device = linear.weight.device
        fresh = bnb.nn.Int8Params(linear.weight.data.clone().cpu(), requires_grad=False, has_fp16_weights=False)
        layer.weight = fresh.to(device)
    else:
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=row_scales)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone().float(), requires_grad=False)
    return layer


class BnBBackend(Backend):
    name = "bnb"
    capabilities = Capabilities(
        uniform_bits=(4, 8),
        group_sizes=(BLOCKSIZE,),
        bitmap="two-level",
        cpu=True,
        gpu=True,
        needs_calibration=False,
        refused_families=(("qwen3_moe", "bitsandbytes replaces nn.Linear modules, and transformers 5 stores a layer's experts as stacked tensors, which it would leave unquantized; use hqq"),
                          ("mixtral", "bitsandbytes replaces nn.Linear modules, and transformers 5 stores a layer's experts as stacked tensors, which it would leave unquantized; use hqq"),
                          ("phi3", "its bit maps address q/k/v and gate/up by their own names, which Phi-3 stacks in qkv_proj and gate_up_proj; use hqq"),),
        serving="mlflow pyfunc; transformers (4-bit maps)",
        clients="transformers with bitsandbytes for 4-bit-only maps (maps with 8-bit modules load there but fail at the first forward: this project's loader)",
        libraries=("bitsandbytes",),
    )

    def transformers_runs(self, checkpoint: Path) -> bool:
        """4-bit-only maps: int8 modules load in transformers but fail at the first forward."""
        layout = Path(checkpoint) / LAYOUT_FILE
        return not (layout.exists() and json.loads(layout.read_text()).get("int8_modules"))

    def check(self, bitmap: BitMap) -> None:
        plan(bitmap)

    def quantize(self, model_path: Path, bitmap: BitMap, calibration, out_dir: Path, options: dict) -> dict:
        from transformers import AutoModelForCausalLM

        from tasks.model_io import linear_param_counts, read_config

        layout = plan(bitmap)
        opts = resolve_options(self.name, option_defaults(self.name), options)
        if opts["quant_type"] not in QUANT_TYPES:
            raise PipelineError(f"bnb quant_type must be one of {QUANT_TYPES}, not {opts['quant_type']!r}")
        unquantized = check_module_keys(bitmap, set(linear_param_counts(read_config(model_path))))
        device = opts["device"] or ("cuda:0" if torch.cuda.is_available() else "cpu")
        # Skipped by transformers: lm_head (stays 16-bit, docs/methods.md §1), linears outside the bit map, and
        # in the two-level case the int8 modules, which are converted below.
        skip = ["lm_head"] + [hf_module_name(k) for k in unquantized]
        if layout["mode"] == "4bit":
            skip += [hf_module_name(k) for k in layout["int8"]]
        log.info("bnb: %d module(s) 4-bit %s, %d int8, %d left in 16-bit, on %s", len(layout["four"]),
                 opts["quant_type"], len(layout["int8"]), len(unquantized), device)

        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, quantization_config=_bnb_config(layout["mode"], skip, opts),
            device_map=device, use_safetensors=True, trust_remote_code=False,
        )
        if layout["mode"] == "4bit":
            for key in layout["int8"]:
                name = hf_module_name(key)
                model.set_submodule(name, _int8_linear(model.get_submodule(name), float(opts["int8_threshold"])))
        seconds = time.perf_counter() - started

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        store_unquantized_16bit(out_dir, {hf_module_name(k) for k in bitmap.modules})
        copy_tokenizer(model_path, out_dir)
        bitmap.save(out_dir / BITMAP_FILE)
        record = {
            "mode": layout["mode"],
            "quant_type": opts["quant_type"] if layout["mode"] == "4bit" else "int8",
            "int8_threshold": float(opts["int8_threshold"]),
            "int8_modules": [hf_module_name(k) for k in layout["int8"]] if layout["mode"] == "4bit" else [],
        }
        (out_dir / LAYOUT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        size = saved_bytes(out_dir)
        log.info("bnb: quantized in %.1f s, saved %.2f MiB to %s", seconds, size / 2**20, out_dir)
        return {
            "quant_seconds": seconds,
            "saved_bytes": size,
            "library": f"bitsandbytes=={version('bitsandbytes')}",
            "mode": record["quant_type"],
            "int8_modules": len(layout["int8"]),
        }

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        from transformers import AutoModelForCausalLM

        out_dir = Path(out_dir)
        if not (out_dir / LAYOUT_FILE).exists():
            raise PipelineError(f"{out_dir} holds no bnb model ({LAYOUT_FILE} is missing)")
        record = json.loads((out_dir / LAYOUT_FILE).read_text())
        _drop_int8_cast_notice()
        with _quiet_transformers(bool(record["int8_modules"])):  # their SCB keys are "unexpected" to it
            model = AutoModelForCausalLM.from_pretrained(
                out_dir, dtype=torch.float32, device_map=device, use_safetensors=True, trust_remote_code=False
            )
        if record["int8_modules"]:
            files = sorted(out_dir.glob("*.safetensors"))
            for name in record["int8_modules"]:
                weight, scales = _read_tensors(files, f"{name}.weight", f"{name}.SCB")
                layer = _int8_linear(model.get_submodule(name), record["int8_threshold"],
                                     weight.to(device), scales.to(device))
                model.set_submodule(name, layer)
        model.eval()
        return model


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_NOTICE)


def _drop_int8_cast_notice() -> None:
    """Process-wide but narrow (one message of one logger): it fires on forwards, after load() returns."""
    notices = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastNotice) for f in notices.filters):
        notices.addFilter(_DropInt8CastNotice())


@contextmanager
def _quiet_transformers(quiet: bool):
    """Silence transformers' load report while the 4-bit loader meets the int8 modules' extra tensors,
    which load() puts in place itself right after."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    if quiet:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _read_tensors(files: list[Path], *names: str) -> list[torch.Tensor]:
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), "pt") as fh:
            for name in names:
                if name in fh.keys():
                    found[name] = fh.get_tensor(name)
    missing = [n for n in names if n not in found]
    if missing:
        raise PipelineError(f"saved bnb model lacks tensors {missing}")
    return [found[n] for n in names]
