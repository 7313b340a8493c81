"""The issue-18 target verdicts that benchmarks/rival_allocators.py prints, on synthetic measured rows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import numpy as np  # noqa: E402
from rival_allocators import _compare, target_verdicts  # noqa: E402

from tasks.ladder import parse_rung  # noqa: E402

RUNGS = [parse_rung(r) for r in ("b3g128", "b3g64", "b3g32", "b4g128", "b4g64")]


def row(ppl: float, kld: float, se: float = 0.01) -> dict:
    return {"ppl_wikitext2": ppl, "ppl_wikitext2_se": ppl * se, "kld_wikitext2": kld, "kld_wikitext2_se": se}


def rows(optimal_kld: dict[str, float], rival_kld: float = 0.5, base_ppl: float = 20.0) -> dict[str, dict]:
    out = {"unquantized": row(base_ppl, 0.0, 0.0)}
    for rung in RUNGS:
        out[f"optimal {rung.label}"] = row(base_ppl * (1 + optimal_kld[rung.label]), optimal_kld[rung.label])
        for rival in ("uniform", "taylor", "delta_loss", "dkld_greedy", "mxq"):
            out[f"{rival} {rung.label}"] = row(base_ppl * (1 + rival_kld), rival_kld)
    return out


def test_all_targets_met_when_optimal_wins_everywhere():
    measured = rows({"3.13": 0.3, "3.25": 0.2, "3.51": 0.1, "4.13": 0.1, "4.25": 0.02})
    measured["uniform 4.13"] = row(20.0 * 1.2, 0.2)
    lines = target_verdicts(measured, RUNGS)
    assert [line[:4] for line in lines] == ["MET ", "MET ", "MET ", "MET "], lines
    assert "at 5 of 5 budget(s)" in lines[1]


def test_a_rival_ahead_at_one_budget_and_the_quality_targets_missed():
    measured = rows({"3.13": 0.3, "3.25": 0.6, "3.51": 0.45, "4.13": 0.2, "4.25": 0.08}, rival_kld=0.5)
    measured["taylor 3.25"] = row(25.0, 0.3)  # a rival better than optimal outside the noise
    measured["uniform 4.13"] = row(22.0, 0.1)
    lines = target_verdicts(measured, RUNGS)
    assert lines[0].startswith("MISS") and "taylor 3.25" in lines[0], lines
    assert "uniform 4.13" in lines[0], lines  # 0.2 against uniform's 0.1 at 4.13
    assert lines[1].startswith("MET ") and "at 3 of 5" in lines[1], lines  # 3.13, 3.51 (0.45 vs 0.5, noise 0.014), 4.25
    assert lines[2].startswith("MISS") and lines[3].startswith("MISS") and "+8.0%" in lines[3], lines


def test_sb30_is_a_rival_at_its_own_memory_and_missing_rows_say_so():
    measured = {"optimal 3.25": row(30, 0.4), "uniform 3.25": row(40, 0.6), "SB30 3.25": row(28, 0.35), "optimal @SB30 3.25": row(29, 0.45)}
    lines = target_verdicts(measured, [parse_rung("b3g64")])
    assert lines[0].startswith("MISS") and "SB30 3.25" in lines[0], lines
    assert lines[1].startswith("n/a"), lines  # 1 of 5 budgets measured: the other four could still make 3
    assert lines[2].startswith("n/a") and lines[3].startswith("n/a"), lines


def test_verdicts_pair_the_tokens_when_both_rows_have_them():
    """Two variants that differ by a small constant on every token: within noise by their own standard
    errors, clearly apart token by token (the pipeline's rule: NOISE_Z paired standard errors)."""
    rng = np.random.default_rng(0)
    hard = rng.gamma(0.5, 1.0, 16384)  # the text's difficulty, shared by both variants
    ours, theirs = hard, hard + 0.02 + rng.normal(0, 0.01, hard.size)
    rows = [{"kld_wikitext2": float(v.mean()), "kld_wikitext2_se": 0.02, "ppl_wikitext2": 1.0} for v in (ours, theirs)]
    assert _compare(*rows) == 0, "unpaired: the 0.02 difference is within the combined standard error"
    for row, values in zip(rows, (ours, theirs)):
        row["tokens"] = {"kld/wikitext2": values}
    assert _compare(*rows) == -1 and _compare(rows[1], rows[0]) == 1
    rows[1]["tokens"]["kld/wikitext2"] = hard + rng.normal(0, 0.5, hard.size)  # unrelated noise: no longer apart
    rows[1]["kld_wikitext2"] = float(rows[1]["tokens"]["kld/wikitext2"].mean())
    assert _compare(*rows) == 0
