"""The base model's next-token distributions on the evaluation windows, computed once per model and
evaluation set and cached as a stage output, so that each quantized variant's KL divergence costs only
its own forward pass.

`reference.safetensors` holds, for every (set, protocol) evaluated and every scored token:
  top_logp/<set>/<protocol>   [tokens, TOP_K] float32  the base model's top-k log-probabilities
  top_ids/<set>/<protocol>    [tokens, TOP_K] int32    their token ids (column 0: the base model's top-1)
  tail_logp/<set>/<protocol>  [tokens, TAIL] float32   log-probabilities of TAIL tokens drawn from the
  tail_ids/<set>/<protocol>   [tokens, TAIL] int32     distribution outside the top k, and their ids
  nll/<set>/<protocol>        [tokens] float64         the base model's NLL of the true next token
About 1 KiB per scored token: 33 MB for the default 16k tokens of two sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tasks.errors import PipelineError
from tasks.evaluation.perplexity import ReferenceDist

log = logging.getLogger(__name__)

TOP_K = 64
TAIL = 64  # samples of the rest of the distribution (the KLD estimate's tail term; perplexity.py)
FILE = "reference.safetensors"


def key(kind: str, dataset: str, protocol: str) -> str:
    return f"{kind}/{dataset}/{protocol}"


class Reference:
    """Read access to a reference file (or an in-memory one being built)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    @classmethod
    def load(cls, directory: str | Path) -> "Reference":
        path = Path(directory) / FILE
        if not path.is_file():
            raise PipelineError(f"the base model's reference {path} is missing")
        return cls(load_file(path))

    def save(self, directory: str | Path) -> None:
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(Path(directory) / FILE))

    def has(self, dataset: str, protocol: str) -> bool:
        return key("top_logp", dataset, protocol) in self.tensors

    def dist(self, dataset: str, protocol: str) -> ReferenceDist:
        get = lambda kind: self.tensors.get(key(kind, dataset, protocol))  # noqa: E731
        return ReferenceDist(get("top_logp"), get("top_ids"), get("tail_logp"), get("tail_ids"))

    def nll(self, dataset: str, protocol: str) -> np.ndarray:
        return self.tensors[key("nll", dataset, protocol)].numpy()

    def add(self, dataset: str, protocol: str, dist: ReferenceDist, nll: np.ndarray) -> None:
        for kind in ("top_logp", "top_ids", "tail_logp", "tail_ids"):
            if getattr(dist, kind) is not None:
                self.tensors[key(kind, dataset, protocol)] = getattr(dist, kind)
        self.tensors[key("nll", dataset, protocol)] = torch.from_numpy(np.ascontiguousarray(nll, dtype=np.float64))
