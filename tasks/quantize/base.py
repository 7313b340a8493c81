"""One interface for every quantization backend: model + bit map + calibration -> saved quantized model.

A backend is registered by name in `tasks.quantize.registry`; the quantization stage and evaluation
only ever talk to this interface, and the orchestration and the registry ask its `Capabilities` (never
its name), so adding a backend touches its module and its row of that table only.
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
from torch import nn

from tasks.bitmap import BitMap
from tasks.errors import PipelineError


# A registered checkpoint that transformers would load wrongly names a model type it does not know and
# keeps the true one under this key (tasks/registry/mlflow_model.py); our loaders read the true one.
HIDDEN_MODEL_TYPE = "quantpipe_model_type"


def true_config(path: Path) -> dict:
    """config.json with the true model type restored (the same dict for a checkpoint that hides none)."""
    config = json.loads((Path(path) / "config.json").read_text())
    if HIDDEN_MODEL_TYPE in config:
        config["model_type"] = config.pop(HIDDEN_MODEL_TYPE)
    return config


@contextmanager
def patched(owner: object, name: str, value: object) -> Iterator[None]:
    """`owner.name` set to `value` for the duration, restored afterwards: how a backend steers a library
    setting that its API does not expose."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


@contextmanager
def plain_checkpoint(path: Path) -> Iterator[Path]:
    """The checkpoint as a library's own loader expects it: the directory itself, or, when it hides its
    model type, a temporary directory of links to its files with the true config.json."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if HIDDEN_MODEL_TYPE not in config:
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="quant-ckpt-") as tmp:
        for item in path.iterdir():
            if item.name != "config.json":
                (Path(tmp) / item.name).symlink_to(item.resolve())
        (Path(tmp) / "config.json").write_text(json.dumps(true_config(path), indent=2))
        yield Path(tmp)


@dataclass(frozen=True)
class OwnErrors:
    """Rung errors of a backend's own quantizer that the profile can measure besides its HQQ rungs, so that
    a method pricing rungs by error (MethodSpec.errors_option) prices this backend's by its own."""

    name: str  # the profile's name for them: option `<name>_errors`, columns out_err_<name> and fisher_dloss_<name>
    title: str  # how notes name the quantizer
    cost: str  # what measuring them costs the profile, for the pre-flight's notes


@dataclass(frozen=True)
class Capabilities:
    uniform_bits: tuple[int, ...]  # weight bit widths a uniform run accepts
    group_sizes: tuple[int, ...]  # group sizes accepted (empty: the backend has no groups)
    bitmap: str  # "any" (every module its own rung), "two-level" (boosted vs base), or "none"
    cpu: bool
    gpu: bool
    needs_calibration: bool
    # model_type -> why this backend cannot quantize that family and what to use instead
    refused_families: tuple[tuple[str, str], ...] = ()
    # Its checkpoints are served (vLLM) with fused q/k/v and gate/up kernels, which take one precision per
    # fused group: bit maps for it tie those modules unless method_options say otherwise.
    fused_kernels: bool = False
    own_errors: OwnErrors | None = None
    ladder: str = "hqq"  # whose rungs its bit maps hold: the HQQ ladder's (bits, group size), or llama.cpp's types ("gguf")
    # The serving engine whose own runtime the evaluation also scores the saved model in (`Backend.runtime`),
    # as (metric prefix, name): its metrics sit beside this project's evaluator's, e.g. llamacpp_ppl_wikitext2.
    runtime: tuple[str, str] | None = None
    imatrix: bool = False  # quantizes with the profile's importance matrix (quantize(..., imatrix=path))
    serving: str = ""  # the registered version's `serving` tag: how it is served, in a few words
    clients: str = ""  # who loads the saved checkpoint directory besides this project (the model card, README's backend table)
    libraries: tuple[str, ...] = ()  # what the loaded model needs besides torch and transformers (its requirements.txt)


    @property
    def own_ladder(self) -> bool:
        """Its rungs are a ladder of its own (llama.cpp's types), profiled as its own errors, not HQQ's."""
        return self.ladder != "hqq"


class Backend:
    """Subclasses implement `quantize` and `load`; both take and return plain paths and modules."""

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    def family_refusal(self, model_type: str) -> str | None:
        """One line on why this backend refuses the family, or None if it quantizes it."""
        reason = dict(self.capabilities.refused_families).get(model_type)
        return f"{self.name} does not quantize {model_type} models: {reason}" if reason else None

    def check(self, bitmap: BitMap) -> None:
        """Raise PipelineError if this backend cannot express `bitmap`. The default serves backends
        that take any mix of the rungs their capabilities list; others override it."""
        if not bitmap.modules:
            raise PipelineError("the bit map has no modules to quantize")
        caps = self.capabilities
        other = sorted({r.name for r in bitmap.modules.values() if r.ladder != caps.ladder})
        if other:
            raise PipelineError(f"{self.name} takes rungs of the {caps.ladder} ladder, not {other}")
        if caps.ladder == "gguf":
            return
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

    def runtime(self, out_dir: Path, context: int) -> nn.Module:
        """The saved model in its serving engine's own runtime (Capabilities.runtime), as a causal LM."""
        raise NotImplementedError

    def generator(self, out_dir: Path):
        """A text generator over the saved model in its serving engine ((prompt, max_new_tokens) -> text), for
        the registered model's pyfunc; None: the pyfunc generates with the `load`ed model (transformers)."""
        return None

    def serving_files(self, out_dir: Path, registered_name: str) -> None:
        """Write what the engine's users need beside the registered checkpoint (an Ollama Modelfile, ...)."""

    def serving_card(self, checkpoint_dir: str, registered_name: str) -> list[str]:
        """The model card's lines on serving the registered checkpoint (at `checkpoint_dir`) with its engine."""
        return []

    def engine_checks(self, out_dir: Path) -> dict[str, str]:
        """Serving engine -> whether it loads the saved checkpoint, by that engine's own loader rules (the
        registered version's tags: `vllm`), where the format claims it."""
        return {}

    def saved_bytes(self, out_dir: Path) -> int:
        """Bytes of the saved weights (the number users compare): its safetensors files."""
        return sum(p.stat().st_size for p in Path(out_dir).rglob("*.safetensors") if p.is_file())

    def transformers_misreads(self, checkpoint: Path) -> bool:
        """Whether transformers would load the saved checkpoint wrongly (it ignores quantization methods it
        does not know): its registered copy then hides its model type (tasks/registry/mlflow_model.py)."""
        return False

    def transformers_runs(self, checkpoint: Path) -> bool:
        """Whether transformers loads and runs the saved checkpoint as it is (the registered model then has
        the transformers flavor)."""
        return False
