"""Comparisons across the variants of one run, on their per-token values (same tokens for all):
which differences are within noise, whether KLD ranks the variants as perplexity does, and how well
the allocator's predicted loss increase ranks them."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np

from tasks.evaluation.stats import NOISE_Z, paired_difference

PRIMARY = "wikitext2"  # the set (paper protocol) that ties and agreement are judged on


def noise_ties(tokens: list[dict], key: str = f"nll/{PRIMARY}") -> list[list[int]]:
    """For each variant, the indices of the others whose mean of `key` differs from its own by less
    than NOISE_Z paired standard errors (variants without per-token values tie with nobody)."""
    ties: list[list[int]] = [[] for _ in tokens]
    for i, j in combinations(range(len(tokens)), 2):
        a, b = tokens[i].get(key), tokens[j].get(key)
        if a is None or b is None or a.shape != b.shape:
            continue
        diff, se = paired_difference(a, b)
        if not (abs(diff) >= NOISE_Z * se):
            ties[i].append(j)
            ties[j].append(i)
    return ties


def ranking_agreement(tokens: list[dict], dataset: str = PRIMARY) -> dict:
    """Over the pairs of variants whose perplexity differs outside noise: on how many does the one with
    the lower perplexity also have the lower KLD."""
    nll, kld = f"nll/{dataset}", f"kld/{dataset}"
    agree = pairs = 0
    disagreeing = []
    for i, j in combinations(range(len(tokens)), 2):
        if any(tokens[x].get(k) is None for x in (i, j) for k in (nll, kld)):
            continue
        diff, se = paired_difference(tokens[i][nll], tokens[j][nll])
        if not abs(diff) >= NOISE_Z * se:
            continue
        pairs += 1
        if np.sign(diff) == np.sign(tokens[i][kld].mean() - tokens[j][kld].mean()):
            agree += 1
        else:
            disagreeing.append((i, j))
    return {"pairs": pairs, "agree": agree, "disagreeing": disagreeing}


def spearman(x: list[float | None], y: list[float | None]) -> tuple[float, int]:
    """Rank correlation over the entries where both are known, and how many those are (nan below 3)."""
    pairs = [(a, b) for a, b in zip(x, y) if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan"), len(pairs)
    from scipy.stats import spearmanr

    rho = spearmanr([a for a, _ in pairs], [b for _, b in pairs]).statistic
    return float(rho), len(pairs)


def run_summary(tokens: list[dict], measured: list[float | None], predicted: list[float | None]) -> tuple[list[str], dict, list[str]]:
    """(per-variant 'within noise of #' cells, run metrics, report lines) for variants in table order."""
    ties = noise_ties(tokens)
    cells = [",".join(str(j + 1) for j in sorted(t)) for t in ties]
    agreement = ranking_agreement(tokens)
    rho, n = spearman(predicted, measured)
    metrics = {"kld_ppl_pairs": agreement["pairs"], "kld_ppl_agree": agreement["agree"]}
    if math.isfinite(rho):
        metrics["pred_dnll_spearman"] = rho
    lines = [
        f"Within noise: perplexity differences under {NOISE_Z:g} paired standard errors on WikiText-2 (same tokens,"
        " blocks of 256 tokens); the last column lists the rows each variant is indistinguishable from.",
        f"KLD vs perplexity: of {agreement['pairs']} pairs whose WikiText-2 perplexity differs outside noise, KLD ranks"
        f" {agreement['agree']} the same way"
        + (f" (disagreeing: {', '.join(f'#{i + 1}/#{j + 1}' for i, j in agreement['disagreeing'])})." if agreement["disagreeing"] else "."),
    ]
    if math.isfinite(rho):
        lines.append(f"Predicted vs measured: Spearman rank correlation {rho:.3f} between the Fisher estimate of the loss"
                     f" increase (pred dNLL) and the measured WikiText-2 NLL increase (dNLL) over {n} variants.")  # fmt: skip
    return cells, metrics, lines
