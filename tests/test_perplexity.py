import math

import numpy as np
import pytest
import torch

from tasks.errors import PipelineError
from tasks.evaluation.perplexity import PROTOCOLS, model_forward, perplexity, score_stream, scored_prefix, windows
from tasks.evaluation.stats import block_se, paired_difference, within_noise


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


# ---- batched scoring, KL divergence, standard errors -------------------------------------------------


def _tiny_lm(vocab=64, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("proto", ["paper", "gptq"])
def test_batched_scoring_equals_one_window_at_a_time_with_all_logits(proto):
    model = _tiny_lm()
    ids = torch.randint(0, 64, (5000,), generator=torch.Generator().manual_seed(1))
    batched = score_stream(model_forward(model), ids, PROTOCOLS[proto])
    one_by_one = perplexity(lambda x: model(input_ids=x, use_cache=False).logits, ids, PROTOCOLS[proto])
    assert batched.nll.shape == one_by_one.nll.shape == (sum(n for _, _, n in windows(5000, PROTOCOLS[proto])),)
    np.testing.assert_allclose(batched.nll, one_by_one.nll, rtol=1e-4, atol=1e-5)


def test_a_prefix_of_the_stream_scores_as_the_short_stream():
    model = _tiny_lm()
    ids = torch.randint(0, 64, (6000,), generator=torch.Generator().manual_seed(2))
    for proto in PROTOCOLS.values():
        long, short = score_stream(model_forward(model), ids, proto), score_stream(model_forward(model), ids[:2048], proto)
        n = scored_prefix(2048, proto)
        assert n == short.tokens_scored
        np.testing.assert_allclose(long.nll[:n], short.nll, rtol=1e-4, atol=1e-5)


def test_kld_against_itself_is_zero_and_against_another_model_matches_the_exact_value():
    base, other = _tiny_lm(seed=0), _tiny_lm(seed=3)
    ids = torch.randint(0, 64, (2500,), generator=torch.Generator().manual_seed(4))
    proto = PROTOCOLS["paper"]
    full = score_stream(model_forward(base), ids, proto, capture_top_k=64).captured  # k = vocab: exact
    top8 = score_stream(model_forward(base), ids, proto, capture_top_k=8).captured
    sampled = score_stream(model_forward(base), ids, proto, capture_top_k=8, capture_tail=32).captured
    same = score_stream(model_forward(base), ids, proto, reference=full)
    assert np.abs(same.kld).max() < 1e-6 and same.top1.all()

    exact = score_stream(model_forward(other), ids, proto, reference=full)
    merged = score_stream(model_forward(other), ids, proto, reference=top8)
    estimated = score_stream(model_forward(other), ids, proto, reference=sampled)
    # by hand, for the first window's tokens: sum p (log p - log q) over the whole vocabulary
    with torch.inference_mode():
        chunk = ids[:1024][None]
        p = torch.log_softmax(base(input_ids=chunk).logits[0, :-1].double(), -1)
        q = torch.log_softmax(other(input_ids=chunk).logits[0, :-1].double(), -1)
    by_hand = (p.exp() * (p - q)).sum(-1).numpy()
    # the stream's log-probabilities are float32 from batched windows (rounding depends on the batch and the
    # thread count): a few 1e-6 in a KLD of about 0.01
    np.testing.assert_allclose(exact.kld[:1023], by_hand, rtol=1e-3, atol=3e-5)
    assert exact.kld.mean() > 0.01
    assert (merged.kld <= exact.kld + 1e-6).all(), "merging the tail never raises the divergence (log-sum inequality)"
    assert merged.kld.mean() < 0.95 * exact.kld.mean(), "and here it visibly lowers it"
    assert estimated.kld.mean() == pytest.approx(exact.kld.mean(), rel=0.03), "the sampled tail is unbiased"
    assert np.array_equal(exact.top1, estimated.top1)
    again = score_stream(model_forward(base), ids, proto, capture_top_k=8, capture_tail=32).captured
    assert torch.equal(again.tail_ids, sampled.tail_ids), "the tail samples are seeded: a reference is reproducible"


def test_block_standard_error_matches_iid_theory_and_grows_with_correlation():
    rng = np.random.default_rng(0)
    iid = rng.normal(3.0, 1.0, 65536)
    assert block_se(iid) == pytest.approx(1.0 / math.sqrt(iid.size), rel=0.15)
    correlated = np.repeat(rng.normal(3.0, 1.0, 65536 // 64), 64)  # runs of 64 equal values
    assert block_se(correlated) > 5 * correlated.std() / math.sqrt(correlated.size)
    assert math.isnan(block_se(iid[:300])), "one block says nothing about the spread"


def test_paired_differences_see_what_separate_errors_hide():
    rng = np.random.default_rng(1)
    shared = rng.gamma(2.0, 1.5, 16384)  # per-token difficulty, common to both variants
    a, b = shared + rng.normal(0, 0.05, shared.size), shared + 0.01 + rng.normal(0, 0.05, shared.size)
    diff, se = paired_difference(b, a)
    assert diff == pytest.approx(0.01, abs=3 * se) and not within_noise(a, b)
    assert within_noise(a, shared + rng.normal(0, 0.05, shared.size))
    assert 0.01 < block_se(a), "the unpaired standard error is larger than the difference itself"


def test_run_comparisons_mark_ties_and_check_the_kld_ranking():
    from tasks.evaluation.compare import ranking_agreement, run_summary

    rng = np.random.default_rng(2)
    shared = rng.gamma(2.0, 1.5, 8192)
    noise = lambda: rng.normal(0, 0.05, shared.size)  # noqa: E731
    tokens = [
        {"nll/wikitext2": shared + noise(), "kld/wikitext2": np.zeros(shared.size)},
        {"nll/wikitext2": shared + 0.3 + noise(), "kld/wikitext2": np.full(shared.size, 0.3)},
        {"nll/wikitext2": shared + 0.3 + noise(), "kld/wikitext2": np.full(shared.size, 0.31)},
        {"nll/wikitext2": shared + 0.9 + noise(), "kld/wikitext2": np.full(shared.size, 0.2)},  # KLD disagrees
    ]
    cells, metrics, lines = run_summary(tokens, [0.0, 0.3, 0.3, 0.9], [None, 0.2, 0.25, 0.8])
    assert cells == ["", "3", "2", ""]
    agreement = ranking_agreement(tokens)
    assert agreement["pairs"] == 5 and agreement["agree"] == 3 and set(agreement["disagreeing"]) == {(1, 3), (2, 3)}
    assert metrics["kld_ppl_pairs"] == 5 and "pred_dnll_spearman" in metrics and any("#2/#4" in line for line in lines)


def test_a_long_pass_reports_its_progress(monkeypatch, caplog):
    import tasks.evaluation.perplexity as perplexity_module

    monkeypatch.setattr(perplexity_module, "PROGRESS_SECONDS", 0.0)  # a line after every batch
    forward = lambda ids, keep: torch.zeros(ids.shape[0], keep, 11)  # noqa: E731
    with caplog.at_level("INFO", logger="tasks.evaluation.perplexity"):
        score_stream(forward, torch.ones(3 * 2048, dtype=torch.long), PROTOCOLS["gptq"], batch_tokens=2048)
    lines = [r.getMessage() for r in caplog.records if "tokens scored" in r.getMessage()]
    assert len(lines) == 2  # none after the last batch
    assert lines[0].startswith("gptq protocol: 2047/6141 tokens scored (33%")
    assert lines[1].startswith("gptq protocol: 4094/6141 tokens scored (67%")
