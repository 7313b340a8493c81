"""Whether vLLM would load a saved GPTQ or compressed-tensors checkpoint, by the rules of vLLM 0.34's own
loaders, checked on config.json and the safetensors headers (no vLLM, no GPU here), so that a registered
version claims vLLM support only where vLLM's code accepts it:

GPTQ (vllm/model_executor/layers/quantization/auto_gptq.py, utils/gptq_utils.py, utils/marlin_utils.py):
  every quantized linear, after its `dynamic` override (matched with re.match on vLLM's module name), must be
  4- or 8-bit symmetric (TYPE_MAP: "Unsupported quantization config: bits=..., sym=..."), group size -1, 32,
  64 or 128 (MARLIN_SUPPORTED_GROUP_SIZES), no act-order unless group size -1 ("desc_act=True is no longer
  supported"), and its input width a multiple of the group size (vLLM sizes scales by K // g); the shards
  of a fused linear (q/k/v -> qkv_proj, gate/up -> gate_up_proj) must resolve to one config, and so must the
  fused name itself, which is what vLLM matches `dynamic` against.
compressed-tensors WNA16 (compressed_tensors.py, schemes/compressed_tensors_wNa16.py): 2- to 8-bit, symmetric
  or with zero points, "pack-quantized", strategy "group" with a group size or "channel", the input width a
  multiple of the group size ("is not divisible by group_size"), and all shards of a fused linear under one
  config group and all or none of them ignored ("Found different quantization schemes for the shards").
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

VLLM = "vLLM 0.34"
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
GPTQ_TYPES = {(4, True), (8, True)}
GPTQ_GROUPS = (-1, 32, 64, 128)
_LINEAR = re.compile(r"^(model\.layers\.\d+)\.(self_attn|mlp)\.([a-z_]+)\.")


def tensor_shapes(checkpoint: Path) -> dict[str, list[int]]:
    """name -> shape of every tensor in the checkpoint's safetensors files (headers only)."""
    shapes = {}
    for path in sorted(Path(checkpoint).glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _linears(shapes: dict, suffix: str) -> dict[str, list[int]]:
    """Linear module name -> the shape of its `suffix` tensor (qweight, weight_packed, weight)."""
    return {name[: -len(suffix) - 1]: shape for name, shape in shapes.items() if name.endswith("." + suffix) and _LINEAR.match(name)}


def _resolved(linears: dict, resolve):
    """(name, tensor shape, its config) of every linear its config quantizes (resolve: None for one left alone)."""
    for name, shape in linears.items():
        config = resolve(name)
        if config is not None:
            yield name, shape, config


def gptq_refusals(config: dict, shapes: dict) -> list[str]:
    """Why vLLM's GPTQ loader would refuse the checkpoint (empty: it loads)."""
    q = config.get("quantization_config") or {}
    base = {k: q.get(k) for k in ("bits", "group_size", "sym", "desc_act")}
    missing = [k for k, v in base.items() if v is None]
    if missing:
        return [f"its quantization_config lacks {', '.join(missing)}"]
    rules = list((q.get("dynamic") or {}).items())

    def resolved(name: str) -> dict | None:  # None: left unquantized by a "-:" rule
        for pattern, override in rules:
            negative, regex = pattern.startswith("-:"), pattern.split(":", 1)[1] if pattern[:2] in ("+:", "-:") else pattern
            if re.match(regex, name):
                return None if negative else {**base, **override}
        return base

    out = []
    quantized = _linears(shapes, "qweight")
    for name, shape, c in _resolved(quantized, resolved):
        k = shape[0] * 32 // int(c["bits"])
        if (int(c["bits"]), bool(c["sym"])) not in GPTQ_TYPES:
            out.append(f"{name}: {c['bits']}-bit {'symmetric' if c['sym'] else 'asymmetric'} (vLLM's GPTQ kernels take 4- and 8-bit symmetric only)")
        if int(c["group_size"]) not in GPTQ_GROUPS:
            out.append(f"{name}: group size {c['group_size']} (vLLM takes {', '.join(map(str, GPTQ_GROUPS))})")
        elif int(c["group_size"]) > 0 and k % int(c["group_size"]):
            out.append(f"{name}: {k} input features are not a whole number of groups of {c['group_size']}")
        if c["desc_act"] and int(c["group_size"]) != -1:
            out.append(f"{name}: act-order (desc_act) with groups, which vLLM no longer supports")
    out += _fused_mismatches(quantized, resolved)
    return out


def _fused_mismatches(linears: dict, resolved, fused_name: bool = True) -> list[str]:
    """The fused linears whose shards resolve to different configs (with `fused_name`, also the fused name
    itself: vLLM's GPTQ matches `dynamic` against it; compressed-tensors falls back to the shards' targets)."""
    out = []
    layers = sorted({_LINEAR.match(n + ".").group(1) for n in linears})
    for layer in layers:
        for fused, shards in FUSED.items():
            names = [f"{layer}.{s}" for s in shards if f"{layer}.{s}" in linears]
            if not names:
                continue
            configs = [resolved(n) for n in names] + ([resolved(f"{layer}.{fused}")] if fused_name else [])
            if any(c != configs[0] for c in configs):
                out.append(f"{layer}.{fused}: its shards ({', '.join(s.rpartition('.')[2] for s in shards)}) do not share one quantization "
                           "config under vLLM's fused name")  # fmt: skip
    return out


def compressed_tensors_refusals(config: dict, shapes: dict) -> list[str]:
    """Why vLLM's compressed-tensors loader (WNA16) would refuse the checkpoint (empty: it loads)."""
    q = config.get("quantization_config") or {}
    groups = q.get("config_groups") or {}
    ignore = q.get("ignore") or []
    fmt = q.get("format")

    def matches(target: str, name: str) -> bool:  # a regex, a module name, or the class name "Linear"
        return bool(re.match(target[3:], name)) if target.startswith("re:") else target in (name, "Linear")

    def group_of(name: str) -> str | None:
        if any(matches(t, name) for t in ignore):
            return None
        return next((g for g, spec in groups.items() if any(matches(t, name) for t in spec.get("targets", []))), None)

    out = []
    linears = _linears(shapes, "weight_packed")
    for name, shape, group in _resolved(linears, group_of):
        w = groups[group].get("weights") or {}
        bits, size, strategy = int(w.get("num_bits", 0)), w.get("group_size"), w.get("strategy")
        k = shape[1] * 32 // bits if bits else 0
        if (groups[group].get("format") or fmt) != "pack-quantized" or groups[group].get("input_activations"):
            out.append(f"{name}: not a weight-only pack-quantized scheme (vLLM's WNA16)")
        if not 2 <= bits <= 8:
            out.append(f"{name}: {bits}-bit weights (vLLM's WNA16 takes 2 to 8)")
        if strategy == "group" and (not size or k % int(size)):
            out.append(f"{name}: {k} input features are not a whole number of groups of {size}")
        elif strategy not in ("group", "channel"):
            out.append(f"{name}: strategy {strategy!r} (vLLM's WNA16 takes group or channel)")
        if w.get("actorder") in ("group", "dynamic"):
            out.append(f"{name}: activation ordering {w['actorder']!r}, which vLLM no longer supports")
    out += _fused_mismatches(linears, group_of, fused_name=False)
    return out


def vllm_verdict(refusals: list[str]) -> str:
    """The registered version's tag: whether vLLM loads it, and why not."""
    if not refusals:
        return f"loads ({VLLM}'s loader rules, checked on the saved config and tensor shapes)"
    more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
    return f"refused by {VLLM}'s loader rules: {refusals[0]}{more}"
