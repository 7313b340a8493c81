"""One interface for every quantization backend: model + bit map + calibration -> saved quantized model.

A backend is registered by name in `tasks.quantize.registry`; the quantization stage and evaluation
only ever talk to this interface, so adding a backend touches nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError


@dataclass(frozen=True)
class Capabilities:
    uniform_bits: tuple[int, ...]  # weight bit widths a uniform run accepts
    group_sizes: tuple[int, ...]  # group sizes accepted (empty: the backend has no groups)
    bitmap: str  # "any" (every module its own rung), "two-level" (boosted vs base), or "none"
    cpu: bool
    gpu: bool
    needs_calibration: bool


class Backend:
    """Subclasses implement `quantize` and `load`; both take and return plain paths and modules."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def check(self, bitmap: BitMap) -> None:
        """Raise PipelineError if this backend cannot express `bitmap`. The default serves backends
        that take any mix of the rungs their capabilities list; others override it."""
        if not bitmap.modules:
            raise PipelineError("the bit map has no modules to quantize")
        caps = self.capabilities
        bad = sorted({r.name for r in bitmap.modules.values() if r.bits not in caps.uniform_bits or r.group_size not in caps.group_sizes})
        if bad:
            raise PipelineError(
                f"{self.name} cannot express rungs {bad}: bits must be one of {caps.uniform_bits} and group size"
                f" one of {caps.group_sizes} (any mix per module)"
            )

    def quantize(
        self, model_path: Path, bitmap: BitMap, calibration: torch.Tensor | None, out_dir: Path, options: dict
    ) -> dict:
        """Quantize the checkpoint at `model_path` by `bitmap`, save it under `out_dir`, return facts
        to record (for example {"quant_seconds": ...}). `calibration` is input_ids [samples, seq_len]."""
        raise NotImplementedError

    def load(self, out_dir: Path, device: str = "cpu") -> nn.Module:
        """Reload a saved quantized model as a causal LM in eval mode (forward(input_ids).logits)."""
        raise NotImplementedError
