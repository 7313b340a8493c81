"""Perplexity under the two protocols of SPEC section 7, as exact token-level averages.

- paper: Hugging Face sliding window (max_length 1024, stride 512). Each window scores only the tokens
  not scored by the previous one; ppl = exp(sum of their NLL / their count).
- gptq: the stream cut into non-overlapping windows of 2048 tokens (a trailing partial window is
  dropped, as GPTQ does); ppl = exp(mean NLL over every predicted token).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from tasks.errors import PipelineError


@dataclass(frozen=True)
class Protocol:
    name: str
    max_length: int
    stride: int


PROTOCOLS = {
    "paper": Protocol("paper", max_length=1024, stride=512),
    "gptq": Protocol("gptq", max_length=2048, stride=2048),
}


@dataclass
class PerplexityResult:
    ppl: float
    nll_sum: float
    tokens_scored: int
    tokens_forwarded: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_forwarded / self.seconds if self.seconds > 0 else float("nan")


def windows(total: int, protocol: Protocol) -> Iterator[tuple[int, int, int]]:
    """Yield (begin, end, scored) windows: tokens [begin, end) are fed, the last `scored` are scored."""
    if protocol.stride == protocol.max_length:  # non-overlapping (GPTQ): full windows only
        for begin in range(0, total - protocol.max_length + 1, protocol.max_length):
            yield begin, begin + protocol.max_length, protocol.max_length - 1
        return
    prev_end = 0
    for begin in range(0, total, protocol.stride):
        end = min(begin + protocol.max_length, total)
        scored = end - prev_end
        if begin == 0:
            scored -= 1  # the first token of the stream has no prediction
        if scored > 0:
            yield begin, end, scored
        prev_end = end
        if end == total:
            break


@torch.no_grad()
def perplexity(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, protocol: Protocol) -> PerplexityResult:
    """`forward(input_ids [1, n]) -> logits [1, n, vocab]`; `ids` is the token stream [1, T] or [T]."""
    ids = ids.reshape(1, -1)
    total = ids.shape[1]
    spans = list(windows(total, protocol))
    if not spans:
        raise PipelineError(
            f"evaluation stream has {total} tokens, too few for one {protocol.name} window of {protocol.max_length}"
        )
    nll_sum, scored_total, fed = 0.0, 0, 0
    started = time.perf_counter()
    for begin, end, scored in spans:
        chunk = ids[:, begin:end]
        logits = forward(chunk)[0, :-1].float()
        targets = chunk[0, 1:]
        losses = F.cross_entropy(logits[-scored:], targets[-scored:], reduction="sum")
        nll_sum += float(losses)
        scored_total += scored
        fed += end - begin
    seconds = time.perf_counter() - started
    ppl = math.exp(nll_sum / scored_total)
    if not math.isfinite(ppl):
        raise PipelineError("perplexity is not finite: the model produces NaN or infinite logits")
    return PerplexityResult(ppl=ppl, nll_sum=nll_sum, tokens_scored=scored_total, tokens_forwarded=fed, seconds=seconds)
