"""The issue-32 target verdicts that benchmarks/rival_allocators.py prints, on synthetic measured rows."""

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
    lines = target_verdicts(measured, RUNGS, ["optimal"], [])
    assert [line[:4] for line in lines] == ["MET ", "MET "], lines
    assert "at 5 of 5 budget(s)" in lines[1]


def test_a_rival_ahead_at_one_budget():
    measured = rows({"3.13": 0.3, "3.25": 0.6, "3.51": 0.45, "4.13": 0.2, "4.25": 0.08}, rival_kld=0.5)
    measured["taylor 3.25"] = row(25.0, 0.3)  # a rival better than optimal outside the noise
    lines = target_verdicts(measured, RUNGS, ["optimal"], [])
    assert lines[0].startswith("MISS") and "taylor 3.25" in lines[0], lines
    assert lines[1].startswith("MET ") and "at 4 of 5" in lines[1], lines  # all but 3.25 (0.45 vs 0.5 at 3.51: noise 0.014)


def test_each_flavor_is_judged_and_the_embedded_row_against_the_fisher_objective():
    measured = rows({"3.13": 0.3, "3.25": 0.2, "3.51": 0.1, "4.13": 0.1, "4.25": 0.02})
    for rung in RUNGS:
        measured[f"optimal[per_token] {rung.label}"] = measured[f"optimal {rung.label}"]
    measured["optimal[per_token] 3.25"] = row(30, 0.6)
    measured["SB30 3.25"], measured["optimal @SB30 3.25"] = row(28, 0.35), row(27, 0.30)
    measured["optimal[per_token] @SB30 3.25"] = row(29, 0.40)
    lines = target_verdicts(measured, RUNGS, ["optimal", "optimal[per_token]"], [])
    assert [line[:4] for line in lines[:2]] == ["MET ", "MET "], lines
    assert lines[2].startswith("MISS") and "taylor 3.25" in lines[2] and "SB30 3.25" in lines[2], lines  # 0.40 against SB30's 0.35
    assert lines[4].startswith("MISS") and "0.4000 vs 0.3000" in lines[4], lines  # worse than the fisher objective's embedded row


def test_sb30_is_a_rival_at_its_own_memory_and_missing_rows_say_so():
    measured = {"optimal 3.25": row(30, 0.4), "uniform 3.25": row(40, 0.6), "SB30 3.25": row(28, 0.35), "optimal @SB30 3.25": row(29, 0.45)}
    lines = target_verdicts(measured, [parse_rung("b3g64")], ["optimal", "optimal[fisher]"], [])
    assert lines[0].startswith("MISS") and "SB30 3.25" in lines[0], lines
    assert lines[1].startswith("n/a"), lines  # 1 of 5 budgets measured: the other four could still make 3
    assert lines[2] == "n/a  optimal[fisher]: not measured", lines


def test_the_estimates_ranking_against_the_measured_dnll():
    rows_ = [("unquantized", None, None, None, {}),
             *((f"v{i}", 3.0 + i / 10, {"fisher": i ** 2, "per_token": (i * 7) % 5}, 0.1, {"dnll_wikitext2": 0.1 * i}) for i in range(6))]  # fmt: skip
    lines = target_verdicts({}, RUNGS, [], rows_)
    assert lines[0].startswith("MET  predicted (fisher estimate)") and "Spearman 1.000 over 6" in lines[0], lines
    assert lines[1].startswith("MISS predicted (per_token estimate)"), lines


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
