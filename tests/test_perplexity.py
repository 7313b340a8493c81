import math

import pytest
import torch

from tasks.errors import PipelineError
from tasks.evaluation.perplexity import PROTOCOLS, perplexity, windows


@pytest.mark.parametrize("total", [600, 1024, 1500, 4096, 5000])
def test_paper_windows_score_every_token_once(total):
    scored = []
    for begin, end, n in windows(total, PROTOCOLS["paper"]):
        assert end - begin <= 1024
        scored.extend(range(end - n, end))
    assert scored == list(range(1, total))


def test_gptq_windows_are_full_and_disjoint():
    spans = list(windows(5000, PROTOCOLS["gptq"]))
    assert spans == [(0, 2048, 2047), (2048, 4096, 2047)]


def test_uniform_logits_give_perplexity_equal_to_vocab_size():
    vocab = 37
    forward = lambda ids: torch.zeros(1, ids.shape[1], vocab)  # noqa: E731
    ids = torch.randint(0, vocab, (1, 3000))
    for proto in PROTOCOLS.values():
        assert perplexity(forward, ids, proto).ppl == pytest.approx(vocab, rel=1e-5)


def test_perfect_model_has_perplexity_one():
    ids = torch.arange(1, 1301).remainder(50).reshape(1, -1)

    def forward(chunk):
        logits = torch.full((1, chunk.shape[1], 50), -1e4)
        nxt = (chunk[0] + 1).remainder(50)
        logits[0, torch.arange(chunk.shape[1]), nxt] = 1e4
        return logits

    assert perplexity(forward, ids, PROTOCOLS["paper"]).ppl == pytest.approx(1.0)


def test_too_short_stream_is_a_clear_error():
    forward = lambda ids: torch.zeros(1, ids.shape[1], 5)  # noqa: E731
    with pytest.raises(PipelineError, match="too few"):
        perplexity(forward, torch.ones(1, 100, dtype=torch.long), PROTOCOLS["gptq"])
    with pytest.raises(PipelineError, match="too few"):
        perplexity(forward, torch.ones(1, 1, dtype=torch.long), PROTOCOLS["paper"])


def test_nan_logits_are_refused():
    forward = lambda ids: torch.full((1, ids.shape[1], 5), math.nan)  # noqa: E731
    with pytest.raises(PipelineError, match="not finite"):
        perplexity(forward, torch.ones(1, 64, dtype=torch.long), PROTOCOLS["paper"])
