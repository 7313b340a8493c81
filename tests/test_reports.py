"""Reports: Pareto front, comparison table, score profiles and the written files."""

from __future__ import annotations

import base64
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tasks.bitmap import BitMap
from tasks.errors import PipelineError
from tasks.ladder import MODULES, parse_rung
from tasks.reports.comparison import comparison_frame, to_html, to_markdown
from tasks.reports.pareto import pareto_mask
from tasks.reports.plots import pareto_points, plot_ppl_vs_size, spread_labels
from tasks.reports.table import results_table
from tasks.reports.profiles import profile_table, score_outliers

FIXTURES = Path(__file__).parent / "fixtures" / "lm-quant-toolkit"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- Pareto front ----------------------------------------------------------------------------------

def test_pareto_front_keeps_only_undominated_points():
    cost = [3.0, 3.0, 3.5, 4.0, 4.2, 4.5, np.nan]
    loss = [200, 180, 190, 40, 41, 35, 1.0]
    # (3.0, 200) is beaten by (3.0, 180); (3.5, 190) by (3.0, 180); (4.2, 41) by (4.0, 40); NaN never counts.
    assert pareto_mask(cost, loss).tolist() == [False, True, False, True, False, True, False]


def test_pareto_front_keeps_exact_duplicates():
    assert pareto_mask([4.0, 4.0, 5.0], [30.0, 30.0, 30.0]).tolist() == [True, True, False]


# --- comparison table --------------------------------------------------------------------------------

def results() -> pd.DataFrame:
    return pd.DataFrame([
        dict(variant="hqq/sensiboost/4.25", backend="hqq", method="sensiboost", budget=4.25, nominal_bpp=4.33,
             extra_pct=1.9, ppl_wikitext2=31.9, ppl_c4=39.5, saved_bytes=153 * 2**20, tokens_per_s=290, quant_seconds=2.3),
        dict(variant="hqq/uniform/3.25", backend="hqq", method="uniform", budget=3.25, nominal_bpp=3.25,
             extra_pct=0.0, ppl_wikitext2=260.2, ppl_c4=300.0, saved_bytes=118 * 2**20, tokens_per_s=300, quant_seconds=2.0),
        dict(variant="none/unquantized/16", backend="none", method="unquantized", budget=16, nominal_bpp=None,
             extra_pct=None, ppl_wikitext2=28.15, ppl_c4=35.1, saved_bytes=540 * 2**20, tokens_per_s=400, quant_seconds=None),
        dict(variant="hqq/uniform/4.25", backend="hqq", method="uniform", budget=4.25, nominal_bpp=4.25,
             extra_pct=0.0, ppl_wikitext2=34.72, ppl_c4=41.0, saved_bytes=150 * 2**20, tokens_per_s=300, quant_seconds=2.1),
    ])


def test_comparison_puts_the_baseline_first_sorts_by_budget_and_computes_deltas():
    frame = comparison_frame(results())
    assert frame["variant"].tolist() == ["none/unquantized/16", "hqq/uniform/3.25", "hqq/uniform/4.25", "hqq/sensiboost/4.25"]
    sb = frame.iloc[3]
    assert sb["d_base_ppl_wikitext2"] == pytest.approx(100 * (31.9 - 28.15) / 28.15)
    assert sb["d_uniform_ppl_wikitext2"] == pytest.approx(100 * (31.9 - 34.72) / 34.72)
    assert math.isnan(frame.iloc[0]["d_base_ppl_wikitext2"]) and math.isnan(frame.iloc[2]["d_uniform_ppl_wikitext2"])
    assert sb["saved_mib"] == pytest.approx(153.0)


def test_markdown_and_html_show_every_variant_and_mark_the_best(tmp_path):
    frame = comparison_frame(results())
    md = to_markdown(frame, champion="hqq/sensiboost/4.25")
    lines = md.splitlines()
    assert lines[0].startswith("| # | variant | backend | method | budget | bpp |")
    assert "ppl (GPTQ)" not in lines[0]  # no GPTQ numbers in the results: no empty columns
    # "#" is the input row (the results table's and the plot's number), not the sorted position
    assert lines[2].startswith("| 3 | none/unquantized/16 |") and lines[5].startswith("| 1 | hqq/sensiboost/4.25 (champion) |")
    assert "**31.90**" in md and "-8.1" in md and md.count("(champion)") == 1
    assert "(champion)" not in to_markdown(frame)
    figure = tmp_path / "ppl_vs_size.png"
    figure.write_bytes(PNG_MAGIC + b"figure bytes")
    page = to_html(frame, "Run", [figure], champion="hqq/sensiboost/4.25")
    assert page.count("<tr") == 5 and "class='num best'>31.90<" in page
    # self-contained: MLflow's sandboxed artifact viewer does not load relative links
    embedded = base64.b64encode(figure.read_bytes()).decode()
    assert f"<img src='data:image/png;base64,{embedded}'" in page
    assert not re.search(r"src=['\"](?!data:)", page)
    assert "<tr class=champion><td class='num'>1</td><td>hqq/sensiboost/4.25 (champion)</td>" in page


def test_results_without_required_columns_are_refused():
    with pytest.raises(PipelineError, match="lacks column"):
        comparison_frame(results().drop(columns="method"))
    with pytest.raises(PipelineError, match="no rows"):
        comparison_frame(results().iloc[0:0])


def test_results_table_marks_the_champion_in_the_version_column():
    rows = [dict(variant="none/unquantized/16", ppl_wikitext2=28.15, version=None),
            dict(variant="hqq/uniform/3.25", ppl_wikitext2=260.2, version=2),
            dict(variant="hqq/sensiboost/3.25", ppl_wikitext2=131.0, version=3, champion=True)]
    plain = results_table([{k: v for k, v in r.items() if k != "champion"} for r in rows])
    marked = results_table(rows)
    assert "(champion)" not in plain and marked.count("(champion)") == 1
    last = [c.strip() for c in marked.splitlines()[-1].split("|")[1:-1]]
    assert last == ["3", "hqq/sensiboost/3.25", "131.00", "3 (champion)"]
    # every other cell as before: only the version column is wider
    strip = lambda t: [[c.strip() for c in line.split("|")] for line in t.splitlines() if not line.startswith("|-")]  # noqa: E731
    assert [r[:-2] for r in strip(marked)] == [r[:-2] for r in strip(plain)]


# --- perplexity vs size --------------------------------------------------------------------------------

def test_pareto_points_use_saved_size_numbers_and_mark_the_champion():
    frame = comparison_frame(results())
    pts = {p.name: p for p in pareto_points(frame, "ppl_wikitext2", champion="hqq/uniform/4.25")}
    assert "none/unquantized/16" not in pts  # the baseline is the reference line, not a point
    sb, u3, u4 = pts["hqq/sensiboost/4.25"], pts["hqq/uniform/3.25"], pts["hqq/uniform/4.25"]
    assert (sb.number, u3.number, u4.number) == (1, 2, 4)  # the input rows: the results table's "#"
    assert (sb.x, u3.x, u4.x) == pytest.approx((153.0, 118.0, 150.0))  # MiB, not bpp
    assert sb.y == pytest.approx(31.9)
    # each is smaller or better than the others
    assert [sb.on_front, u3.on_front, u4.on_front] == [True, True, True]
    assert [p.is_champion for p in (sb, u3, u4)] == [False, False, True]
    worse = results()
    worse.loc[0, "ppl_wikitext2"] = 40.0  # bigger and worse than 4.25 uniform: off the front
    assert not {p.name: p for p in pareto_points(comparison_frame(worse), "ppl_wikitext2")}["hqq/sensiboost/4.25"].on_front


def test_pareto_points_fall_back_to_nominal_bpp_without_saved_sizes():
    frame = comparison_frame(results().drop(columns="saved_bytes"))
    pts = {p.name: p for p in pareto_points(frame, "ppl_wikitext2")}
    assert pts["hqq/sensiboost/4.25"].x == pytest.approx(4.33) and not any(p.is_champion for p in pts.values())


def test_spread_labels_separates_only_overlapping_numbers():
    # two variants at the same size and almost the same perplexity, a third far away
    y = spread_labels([(100.0, 50.0), (100.0, 51.0), (300.0, 50.0)], [8.0, 8.0, 8.0], height=8.0)
    assert y[1] - y[0] == pytest.approx(8.0, abs=0.02) and y[0] + y[1] == pytest.approx(101.0)  # apart, order kept
    assert y[2] == 50.0
    assert spread_labels([(0.0, 0.0), (0.0, 0.0)], [8.0, 8.0]).tolist() != [0.0, 0.0]  # exact duplicates too


def test_ppl_vs_size_plot_keys_every_number_and_names_the_champion(tmp_path, caplog):
    frame = comparison_frame(results())
    path, labels = plot_ppl_vs_size(frame, tmp_path / "ppl_vs_size.png", champion="hqq/sensiboost/4.25")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert "champion" in labels and "Pareto front" in labels and "unquantized baseline" in labels
    key = [label for label in labels if re.match(r"\s*\d+  ", label)]
    assert [k.split() for k in key] == [["1", "hqq/sensiboost/4.25", "(champion)"], ["2", "hqq/uniform/3.25"],
                                        ["3", "none/unquantized/16", "(baseline)"], ["4", "hqq/uniform/4.25"]]
    _, plain = plot_ppl_vs_size(frame, tmp_path / "plain.png")
    assert "champion" not in plain and not any("(champion)" in label for label in plain)
    with caplog.at_level("WARNING"):
        assert plot_ppl_vs_size(comparison_frame(results().drop(columns="saved_bytes")), tmp_path / "bpp.png") is not None
    assert "against nominal bpp" in caplog.text


# --- score profiles ----------------------------------------------------------------------------------

def synthetic_scores(layers: int = 24, spike: int = 10, lim: bool = True) -> pd.DataFrame:
    """Smooth scores with one spike at `spike`; a b2g128 row per module carries decoy values."""
    rng = np.random.default_rng(0)
    rows = []
    for layer in range(layers):
        for module in MODULES:
            kurt = 3.0 + 0.05 * rng.standard_normal() + (20.0 if layer == spike else 0.0)
            sens = 1e-4 * (1.05 ** layer) * (1 + 0.01 * rng.standard_normal()) * (50.0 if layer == spike else 1.0)
            for nbit, gsize, scale in ((4, 64, 1.0), (2, 128, 1000.0)):
                row = dict(layer=layer, module=module, nbit1=nbit, gsize1=gsize, kurtosis=kurt * scale, sensitivity=sens * scale)
                if lim:
                    row.update(lim=-0.9 + 0.01 * layer, zd=0.15)
                rows.append(row)
    return pd.DataFrame(rows)


def test_profile_table_reads_the_b4g64_rows():
    table = profile_table(synthetic_scores())
    assert len(table) == 24 * 7
    assert table["kurtosis"].max() < 30  # not the decoy b2g128 rows


def test_outliers_follow_the_spec_rule():
    found = score_outliers(profile_table(synthetic_scores()))
    for module in MODULES:
        assert found["sensitivity"][module] == [10, 11]  # ratio x50 into the spike is more extreme than /50 out
        assert set(found["kurtosis"][module]) == {10, 11}  # difference: into and out of the spike


@pytest.mark.skipif(not (FIXTURES / "fnorm-Llama-2-7b-hf.csv").exists(), reason="authors' fixtures not present")
def test_kurtboost_top1_outliers_match_the_spec_example():
    """docs/methods.md §4: KB21 on Llama-2-7B boosts q[1], k[1], v[2], down[2], gate[30], up[30], o[31]."""
    found = score_outliers(profile_table(pd.read_csv(FIXTURES / "fnorm-Llama-2-7b-hf.csv")))["kurtosis"]
    top1 = {module.split(".")[1]: layers[0] for module, layers in found.items()}
    assert top1 == {"q_proj": 1, "k_proj": 1, "v_proj": 2, "down_proj": 2, "gate_proj": 30, "up_proj": 30, "o_proj": 31}


# --- files -------------------------------------------------------------------------------------------

def tiny_bitmap(method: str, boosted: set[str]) -> dict:
    params = {f"{layer}.{m}": 4096 for layer in range(24) for m in MODULES}
    base = parse_rung("4.25")
    modules = {k: (parse_rung("8.13") if k in boosted else base) for k in params}
    data = BitMap(method, modules, params, budget=base.bpp).to_json()
    return {**data, "variant": f"hqq/{method}/4.25"}


def test_write_reports_writes_every_file_and_the_cli_agrees(tmp_path, capsys):
    from tasks.__main__ import main
    from tasks.reports import write_reports

    bitmaps = [tiny_bitmap("uniform", set()), tiny_bitmap("sensiboost", {"10.mlp.down_proj", "0.self_attn.o_proj"})]
    paths = write_reports(results(), bitmaps, synthetic_scores(), tmp_path / "out", champion="hqq/sensiboost/4.25")
    names = sorted(p.name for p in paths)
    assert names == sorted(["comparison.md", "comparison.html", "ppl_vs_size.png", "bitmap_hqq_uniform_4.25.png",
                            "bitmap_hqq_sensiboost_4.25.png", "score_profiles.png", "outliers.json"])
    for p in paths:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 10_000
    assert json.loads((tmp_path / "out" / "outliers.json").read_text())["sensitivity"]["mlp.down_proj"] == [10, 11]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary leftovers
    page = (tmp_path / "out" / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and not re.search(r"src=['\"](?!data:)", page)
    assert "hqq/sensiboost/4.25 (champion)" in (tmp_path / "out" / "comparison.md").read_text()

    # The CLI from files: the results CSV, a directory of bit maps (other JSON ignored), a scores CSV
    # without LIM/ZD (those panels say so instead of failing).
    results().to_csv(tmp_path / "results.csv", index=False)
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "a.json").write_text(json.dumps(bitmaps[1]))
    (tmp_path / "maps" / "manifest.json").write_text("{}")
    synthetic_scores(lim=False).to_csv(tmp_path / "scores.csv", index=False)
    args = ["report", "--results", str(tmp_path / "results.csv"), "--bitmaps", str(tmp_path / "maps"),
            "--scores", str(tmp_path / "scores.csv"), "--out", str(tmp_path / "cli"), "--champion", "hqq/uniform/3.25"]
    assert main(args) == 0
    printed = capsys.readouterr().out.split()
    assert str(tmp_path / "cli" / "bitmap_hqq_sensiboost_4.25.png") in printed and len(printed) == 6
    assert "hqq/uniform/3.25 (champion)" in (tmp_path / "cli" / "comparison.md").read_text()

    assert main(["report", "--results", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"error: results file not found: {tmp_path / 'nope.csv'}"
