"""SensiBoost/KurtBoost reproduction (docs/methods.md §4): the authors' scores in, their allocations out.

Fixtures are the authors' files from schnell18/lm-quant-toolkit, unchanged: fnorm-<model>.csv (scores),
allot-<method>-<boost_stop>-<top_m>.csv (their allocation for 3 models x 6 budgets, b1/g1 per module and
layer) and effective_bpp.csv (base and effective bpp, extra percentage and boosted count per run).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pandas as pd
import pytest

from tasks.allocation import allocate, read_scores
from tasks.ladder import Rung, module_key, parse_rung

FIXTURES = Path(__file__).parent / "fixtures" / "lm-quant-toolkit"
MODELS = ("Llama-2-7b-hf", "Llama-2-13b-hf", "Meta-Llama-3-8B")
ALLOT_FILES = sorted(p.name for p in FIXTURES.glob("allot-*.csv"))
METHOD = {"sensi-boost": "sensiboost", "kurt-boost": "kurtboost", "sensi-abl": "sensiboost", "kurt-abl": "kurtboost"}


def parse_attempt(name: str) -> tuple[str, int, int]:
    """'kurt-boost-2-1' -> ('kurt-boost', 2, 1)."""
    head, stop, top = name.rsplit("-", 2)
    return head, int(stop), int(top)


@lru_cache(maxsize=None)
def scores(model: str):
    return read_scores(FIXTURES / f"fnorm-{model}.csv")


@lru_cache(maxsize=None)
def allot(name: str) -> pd.DataFrame:
    return pd.read_csv(FIXTURES / name)


def test_fixtures_are_complete():
    assert len(ALLOT_FILES) == 6
    for name in ALLOT_FILES:
        assert set(allot(name)["model"]) == set(MODELS)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ALLOT_FILES)
def test_published_allocation_row_for_row(name, model):
    head, stop, top = parse_attempt(name[len("allot-") : -len(".csv")])
    published = allot(name)[lambda d: d["model"] == model]
    budgets = sorted(published["bit_budget"].unique())
    assert len(budgets) == 6
    for budget in budgets:
        rows = published[published["bit_budget"] == budget]
        bitmap = allocate(scores(model), METHOD[head], budget, {"boost_stop": stop, "top_m": top})
        assert len(rows) == len(bitmap.modules)
        expected = {module_key(r.layer, r.module): Rung(int(r.b1), int(r.g1)) for r in rows.itertuples()}
        wrong = {k: (bitmap.modules[k].name, v.name) for k, v in expected.items() if bitmap.modules[k] != v}
        assert not wrong, f"{name} {model} {budget}: {len(wrong)} modules differ, e.g. {list(wrong.items())[:3]}"
        assert bitmap.budget == parse_rung(budget).bpp
        assert set(rows["b2"]) == {8} and set(rows["g2"]) == {128}


def test_spec_example_kb21_llama2_7b_425():
    bitmap = allocate(scores("Llama-2-7b-hf"), "kurtboost", 4.25, {"boost_stop": 2, "top_m": 1})
    boosted = {k for k, r in bitmap.modules.items() if r != Rung(4, 64)}
    assert boosted == {
        "1.self_attn.q_proj",
        "1.self_attn.k_proj",
        "2.self_attn.v_proj",
        "2.mlp.down_proj",
        "30.mlp.gate_proj",
        "30.mlp.up_proj",
        "31.self_attn.o_proj",
    }
    assert {bitmap.modules[k] for k in boosted} == {Rung(8, 128)}
    assert bitmap.options["n_boosted"] == 7


def test_paper_defaults_are_sb30_and_kb21():
    s = scores("Llama-2-7b-hf")
    assert allocate(s, "sensiboost", "b4g64").modules == allocate(s, "sensiboost", 4.25, {"boost_stop": 3, "top_m": 0}).modules
    assert allocate(s, "kurtboost", "b4g64").modules == allocate(s, "kurtboost", 4.25, {"boost_stop": 2, "top_m": 1}).modules


def test_effective_bpp_figures():
    """Every row of effective_bpp.csv, the random-layer ablations included (their layers are random,
    but per module type the layers have equal sizes, so the figures are determined)."""
    table = pd.read_csv(FIXTURES / "effective_bpp.csv")
    assert len(table) == 144
    for row in table.itertuples():
        head, stop, top = parse_attempt(row.attempt)
        options = {"boost_stop": stop, "top_m": top}
        if "abl" in head:
            options.update(ablation=True, seed=0)
        bitmap = allocate(scores(row.model), METHOD[head], row.budget, options)
        got = (round(bitmap.budget, 3), round(bitmap.nominal_bpp, 3), round(bitmap.extra_pct, 2), bitmap.options["n_boosted"], len(bitmap.modules))
        assert got == (row.base_bpp, row.eff_bpp, row.extra_pct, row.n_boosted, row.n_mod), row


def test_ablation_avoids_outlier_layers():
    s = scores("Llama-2-7b-hf")
    real = allocate(s, "sensiboost", "b3g64")
    control = allocate(s, "sensiboost", "b3g64", {"ablation": True, "seed": 3})
    for module, layers in control.options["outliers"].items():
        assert len(layers) == len(real.options["outliers"][module])
        assert not set(layers) & set(real.options["outliers"][module])
