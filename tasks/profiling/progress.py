"""Per-layer checkpoints of a profile in progress, so that a killed attempt resumes where it stopped.

A profile on a 70B model runs for hours; spot pods are preempted and OOM kills come without warning.
As ExLlamaV2's converter does for its measurement, the profiler saves, after every decoder layer, all
the state the next layer needs: the rows and per-rung output errors of the finished layers and the
calibration hidden states (and, in the backward pass, the output gradients and the squared-gradient
sums). The files live in the output's partial directory, which the stage's cache key names and a rerun
adopts (`StageOutput.build(resume=True)`), so a rerun of the same inputs continues from the last
finished layer and writes the same scores as an uninterrupted run.

Every save is atomic: tensors go to files named by the step they belong to, and `state.json` (replaced
last, with os.replace) says which step is complete; a kill between the two leaves the previous step's
state valid. A state written for other parameters (another calibration, rungs or batch size) is
ignored and removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from tasks.artifacts import write_json_atomic

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"


class ProfileProgress:
    """The progress directory of one profile: `state.json` plus per-step tensor files."""

    def __init__(self, out_dir: str | Path, signature: dict):
        self.dir = Path(out_dir) / PROGRESS_DIR
        self.signature = signature
        self.state: dict = {"signature": signature, "forward_done": 0, "backward_next": None}
        self.dir.mkdir(parents=True, exist_ok=True)
        state_file = self.dir / "state.json"
        if state_file.exists():
            try:
                saved = json.loads(state_file.read_text())
            except ValueError:
                saved = None
            if saved and saved.get("signature") == signature:
                self.state = saved
            else:  # another profile's leftovers (or unreadable): start over
                shutil.rmtree(self.dir)
                self.dir.mkdir(parents=True)
        if self.state["forward_done"] == 0 and self.state["backward_next"] is None:
            self._commit()

    @property
    def stash_dir(self) -> Path:
        return self.dir / "stash"

    # ---- forward pass: after layer i, rows and errors of layer i and the hidden states into layer i+1

    @property
    def forward_done(self) -> int:
        return int(self.state["forward_done"])

    def save_layer(self, index: int, rows: list[dict], errors: dict[str, torch.Tensor], hidden: torch.Tensor) -> None:
        from safetensors.torch import save_file

        save_file({m: e.contiguous().cpu() for m, e in errors.items()}, str(self.dir / f"errors-{index}.safetensors"))
        (self.dir / f"rows-{index}.json").write_text(json.dumps(rows))
        save_file({"hidden": hidden.contiguous().cpu()}, str(self.dir / f"hidden-{index + 1}.safetensors"))
        self._commit(forward_done=index + 1)
        (self.dir / f"hidden-{index}.safetensors").unlink(missing_ok=True)

    def load_forward(self, device: torch.device) -> tuple[list[dict], dict[str, torch.Tensor], torch.Tensor]:
        """Rows, per-module row errors (as saved: keyed `layer.module`) and hidden states after `forward_done` layers."""
        from safetensors.torch import load_file

        rows: list[dict] = []
        errors: dict[str, torch.Tensor] = {}
        for index in range(self.forward_done):
            rows += json.loads((self.dir / f"rows-{index}.json").read_text())
            errors.update(_aligned(load_file(str(self.dir / f"errors-{index}.safetensors"))))
        hidden = _aligned(load_file(str(self.dir / f"hidden-{self.forward_done}.safetensors"), device=str(device)))["hidden"]
        return rows, errors, hidden

    # ---- backward pass: after layer i (from the last down), the gradient into it and the sums so far

    @property
    def backward_next(self) -> int | None:
        return self.state.get("backward_next")

    def save_backward(self, next_index: int, grad: torch.Tensor, squares: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({"grad": grad.contiguous().cpu(), **{f"sq.{k}": v.cpu() for k, v in squares.items()}},
                  str(self.dir / f"grad-{next_index}.safetensors"))  # fmt: skip
        previous = self.backward_next
        self._commit(backward_next=next_index)
        if previous is not None:
            (self.dir / f"grad-{previous}.safetensors").unlink(missing_ok=True)

    def load_backward(self, device: torch.device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from safetensors.torch import load_file

        saved = _aligned(load_file(str(self.dir / f"grad-{self.backward_next}.safetensors"), device=str(device)))
        return saved.pop("grad"), {k[len("sq.") :]: v for k, v in saved.items()}

    def _commit(self, **changes) -> None:
        self.state.update(changes)
        write_json_atomic(self.dir / "state.json", self.state)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _aligned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies in fresh (allocator-aligned) memory: a tensor loaded from a file can start at any 8-byte offset,
    and BLAS takes another code path (another summation order) for unaligned data, which would make a resumed
    profile differ from an uninterrupted one in the last digit."""
    return {k: v.clone() for k, v in tensors.items()}
