"""Token-level scoring of a stream under the two perplexity protocols, batched, with the KL divergence
from the base model where its reference is given.

Protocols (exact token-level averages):
- paper: Hugging Face sliding window (max_length 1024, stride 512). Each window scores only the tokens
  not scored by the previous one; ppl = exp(sum of their NLL / their count).
- gptq: the stream cut into non-overlapping windows of 2048 tokens (a trailing partial window is
  dropped, as GPTQ does); ppl = exp(mean NLL over every predicted token).

Speed: windows of one shape are forwarded together (up to `batch_tokens` tokens per forward), the model
computes logits only at the positions that are scored (transformers' `logits_to_keep`), and the whole
pass runs under `torch.inference_mode`.

KL divergence: the reference holds, for every scored token, the base model's top-k log-probabilities
with their token ids, and `tail` tokens drawn from the base distribution outside its top k (with
replacement, seeded) with their log-probabilities. With p the base distribution, q the evaluated one,
T the top k and R the rest of the vocabulary (p_R = 1 - sum_T p):

    KLD(p || q) = sum_{i in T} p_i (log p_i - log q_i) + p_R * E_{i ~ p|R} [log p_i - log q_i]

the first term exact, the second estimated by the mean over the tail samples: unbiased per token, its
noise averaging out over the tokens (benchmarks/kld_topk_error.py measures both). Merging R into one
outcome instead, as a top-k-only cache must, underestimates the divergence by p_R * KLD(p|R || q|R):
13-20% on SmolLM2 at k = 64, whose distributions keep 13% of their mass outside the top 64.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from tasks.errors import PipelineError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    name: str
    max_length: int
    stride: int


PROTOCOLS = {
    "paper": Protocol("paper", max_length=1024, stride=512),
    "gptq": Protocol("gptq", max_length=2048, stride=2048),
}
BATCH_TOKENS = 4096  # tokens per forward: 4 paper windows, 2 GPTQ windows
PROGRESS_SECONDS = 60.0  # at most one progress line per minute of scoring

# forward(input_ids [B, n], keep) -> logits [B, keep, vocab] of the last `keep` positions
Forward = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class ReferenceDist:
    """The base model's distribution at each scored token: top-k and tail samples (see above)."""

    top_logp: torch.Tensor  # [tokens, k] float32
    top_ids: torch.Tensor  # [tokens, k] int32, column 0 the most likely token
    tail_logp: torch.Tensor | None = None  # [tokens, s] float32
    tail_ids: torch.Tensor | None = None  # [tokens, s] int32

    @property
    def tokens(self) -> int:
        return self.top_logp.shape[0]

    def rows(self, sl: slice) -> "ReferenceDist":
        cut = lambda t: None if t is None else t[sl]  # noqa: E731
        return ReferenceDist(self.top_logp[sl], self.top_ids[sl], cut(self.tail_logp), cut(self.tail_ids))


@dataclass
class StreamScores:
    """Per scored token, in stream order: NLL, and against a reference KLD and top-1 agreement."""

    nll: np.ndarray
    tokens_forwarded: int
    seconds: float
    kld: np.ndarray | None = None
    top1: np.ndarray | None = None
    captured: ReferenceDist | None = None  # this model's distribution, when asked to capture it

    @property
    def ppl(self) -> float:
        return math.exp(float(self.nll.mean()))

    @property
    def tokens_scored(self) -> int:
        return int(self.nll.size)

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


def scored_prefix(tokens: int, protocol: Protocol) -> int:
    """How many scored tokens the first `tokens` tokens of a stream give: the same tokens, scored the same
    way, open every longer stream (both protocols), so a prefix of a long evaluation is a short one."""
    return sum(n for _, _, n in windows(tokens, protocol))


def model_forward(model, bos: int | None = None):
    """A transformers causal LM as a Forward: logits only at the kept positions, no KV cache. `bos`: every
    window's first token is replaced by it (a model whose tokenizer puts BOS before every text, as llama.cpp's
    perplexity does); a window's first token is only ever context, so the same tokens are scored."""

    def forward(ids: torch.Tensor, keep: int) -> torch.Tensor:
        if bos is not None:
            ids = ids.clone()
            ids[:, 0] = bos
        try:
            return model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
        except TypeError as exc:  # a model class without logits_to_keep: all logits, then the kept ones
            if "logits_to_keep" not in str(exc):
                raise
            return model(input_ids=ids, use_cache=False).logits[:, -keep:]

    return forward


def score_stream(
    forward: Forward,
    ids: torch.Tensor,
    protocol: Protocol,
    reference: ReferenceDist | None = None,
    capture_top_k: int = 0,
    capture_tail: int = 0,
    batch_tokens: int = BATCH_TOKENS,
    seed: int = 0,
) -> StreamScores:
    """Score `ids` ([T] or [1, T]) under `protocol`. `reference`: the base model's distribution at every
    scored token, as the base model's own pass returns it with `capture_top_k` (and `capture_tail`
    samples from outside the top k, drawn with a generator seeded by `seed`)."""
    ids = ids.reshape(-1)
    spans = list(windows(ids.numel(), protocol))
    if not spans:
        raise PipelineError(f"evaluation stream has {ids.numel()} tokens, too few for one {protocol.name} window of {protocol.max_length}")
    offsets = np.cumsum([0] + [n for _, _, n in spans])
    total = int(offsets[-1])
    if reference is not None and reference.tokens != total:
        raise PipelineError(f"the base model's reference has {reference.tokens} tokens where this stream scores {total}")
    nll = torch.empty(total, dtype=torch.float64)
    kld = torch.empty(total, dtype=torch.float64) if reference is not None else None
    top1 = torch.empty(total, dtype=torch.bool) if reference is not None else None
    captured = None
    if capture_top_k:
        captured = ReferenceDist(torch.empty(total, capture_top_k), torch.empty(total, capture_top_k, dtype=torch.int32))
        if capture_tail:
            captured.tail_logp, captured.tail_ids = torch.empty(total, capture_tail), torch.empty(total, capture_tail, dtype=torch.int32)
    generator = torch.Generator().manual_seed(seed)

    # Windows of one shape go through the model together, each batch at most batch_tokens tokens.
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, (begin, end, scored) in enumerate(spans):
        by_shape.setdefault((end - begin, scored), []).append(i)
    started = last_report = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for (length, scored), members in by_shape.items():
            per_batch = max(1, batch_tokens // length)
            for b in range(0, len(members), per_batch):
                batch = members[b : b + per_batch]
                chunk = torch.stack([ids[spans[i][0] : spans[i][1]] for i in batch])
                logits = forward(chunk, scored + 1)[:, :-1]  # position t predicts token t+1
                for row, i in enumerate(batch):
                    sl = slice(int(offsets[i]), int(offsets[i + 1]))
                    logp = torch.log_softmax(logits[row, -scored:].float(), dim=-1)
                    targets = chunk[row, -scored:]
                    nll[sl] = -logp.gather(1, targets[:, None])[:, 0].double()
                    if reference is not None:
                        kld[sl], top1[sl] = _kld(logp, reference.rows(sl))
                    if captured is not None:
                        _capture(logp, captured, sl, capture_top_k, capture_tail, generator)
                del logits
                done += sum(spans[i][2] for i in batch)
                now = time.perf_counter()
                if now - last_report >= PROGRESS_SECONDS and done < total:  # a whole set takes minutes on a CPU
                    last_report, rate = now, done / (now - started)
                    log.info("%s protocol: %d/%d tokens scored (%.0f%%, %.0f tok/s, about %.0f s left)", protocol.name, done, total,
                             100 * done / total, rate, (total - done) / rate)  # fmt: skip
    seconds = time.perf_counter() - started
    if not torch.isfinite(nll).all():
        raise PipelineError("perplexity is not finite: the model produces NaN or infinite logits")
    return StreamScores(
        nll=nll.numpy(),
        tokens_forwarded=sum(end - begin for begin, end, _ in spans),
        seconds=seconds,
        kld=None if kld is None else kld.numpy(),
        top1=None if top1 is None else top1.numpy(),
        captured=captured,
    )


def _capture(logp: torch.Tensor, into: ReferenceDist, sl: slice, k: int, tail: int, generator: torch.Generator) -> None:
    values, indices = logp.topk(k, dim=-1)
    into.top_logp[sl], into.top_ids[sl] = values, indices.to(torch.int32)
    if tail:
        rest = logp.exp().scatter(1, indices, 0.0)  # the distribution outside the top k (unnormalized)
        drawn = torch.multinomial(rest.clamp_min(0.0) + 1e-30, tail, replacement=True, generator=generator)
        into.tail_logp[sl], into.tail_ids[sl] = logp.gather(1, drawn), drawn.to(torch.int32)


def _kld(logq: torch.Tensor, ref: ReferenceDist) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: KLD(p || q) (exact over the top k, the tail estimated from its samples, or merged into
    one outcome without them), and whether q's most likely token is p's."""
    top_ids = ref.top_ids.long()
    q_top = logq.gather(1, top_ids).double()
    p_lp = ref.top_logp.double()
    p_top = p_lp.exp()
    head = (p_top * (p_lp - q_top)).sum(1)
    p_rest = (1.0 - p_top.sum(1)).clamp_min(0.0)
    if ref.tail_ids is not None:
        q_tail = logq.gather(1, ref.tail_ids.long()).double()
        tail = p_rest * (ref.tail_logp.double() - q_tail).mean(1)
    else:
        q_rest = (1.0 - q_top.exp().sum(1)).clamp_min(1e-30)
        tail = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-300).log() - q_rest.log()), torch.zeros_like(p_rest))
    return head + tail, logq.argmax(1) == top_ids[:, 0]


def perplexity(forward: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor, protocol: Protocol) -> StreamScores:
    """One window at a time through `forward(input_ids [1, n]) -> logits [1, n, vocab]`: for callables
    that are not a transformers model."""
    return score_stream(lambda chunk, keep: forward(chunk)[:, -keep:], ids, protocol, batch_tokens=0)
