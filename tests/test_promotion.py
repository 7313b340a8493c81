"""Promotion: the pure rule, then the rule applied to a real (SQLite) MLflow registry."""

from __future__ import annotations

import pytest

from tasks.errors import PipelineError
from tasks.registry.promotion import Candidate, Rule, decide

C = Candidate


def best(**kw) -> Rule:
    """The plain rule: the best perplexity wins whatever its size (no tolerance)."""
    return Rule(**{"metric": "ppl_wikitext2", "tolerance": None, **kw})


def within(tolerance=0.35, **kw) -> Rule:
    """The default rule: the smallest version whose KLD is within the tolerance."""
    return Rule(metric="kld_wikitext2", tolerance=tolerance, **kw)


# --- the pure rule -------------------------------------------------------------------------------

def test_no_champion_promotes_the_best():
    d = decide([C(1, 30.0, 100), C(2, 28.0, 120), C(3, 29.0, 90)], None, best())
    assert (d.action, d.champion, d.previous) == ("promote", 2, None)


def test_memory_cap_excludes_bigger_versions():
    d = decide([C(1, 30.0, 100), C(2, 28.0, 120), C(3, 29.0, 90)], None, best(max_saved_bytes=110))
    assert d.champion == 3 and d.eligible == 2


def test_small_improvement_keeps_the_champion():
    d = decide([C(1, 30.0, 100), C(2, 29.8, 100)], 1, best(min_improvement_pct=1.0))
    assert d.action == "keep" and d.champion == 1 and d.best == 2
    assert d.improvement_pct == pytest.approx(100 * 0.2 / 30)


def test_large_improvement_replaces_the_champion():
    d = decide([C(1, 30.0, 100), C(2, 29.0, 100)], 1, best(min_improvement_pct=1.0))
    assert (d.action, d.champion, d.previous) == ("promote", 2, 1)
    assert d.improvement_pct == pytest.approx(100 / 30)


def test_equal_value_never_churns_even_at_zero_threshold():
    d = decide([C(1, 30.0, 100), C(2, 30.0, 90)], 1, best(min_improvement_pct=0.0))
    assert d.action == "keep" and d.champion == 1


def test_champion_over_a_new_cap_is_replaced():
    d = decide([C(1, 28.0, 200), C(2, 29.5, 100)], 1, best(max_saved_bytes=150))
    assert (d.action, d.champion) == ("promote", 2)
    assert "no longer eligible" in d.reason


def test_versions_without_the_metric_are_ignored():
    d = decide([C(1, None, 10), C(2, float("nan"), 10), C(3, 40.0, 10)], None, best())
    assert d.champion == 3 and d.eligible == 1


def test_no_eligible_version_is_a_one_line_error():
    with pytest.raises(PipelineError) as err:
        decide([C(1, 30.0, 200)], None, best(max_saved_bytes=100))
    assert "\n" not in str(err.value) and "ppl_wikitext2" in str(err.value)


def test_higher_is_better_for_scores():
    d = decide([C(1, 0.50, 1), C(2, 0.60, 1)], 1, best(lower_is_better=False, min_improvement_pct=5.0))
    assert (d.action, d.champion) == ("promote", 2)
    assert d.improvement_pct == pytest.approx(20.0)


def test_a_version_that_failed_its_reload_check_is_never_champion():
    cands = [C(1, 20.0, 100, "failed"), C(2, 25.0, 100, "passed"), C(3, 19.0, 100, None)]
    assert decide(cands, None, best()).champion == 2
    demoted = decide(cands, 1, best())
    assert demoted.champion == 2 and "reload check failed" in demoted.reason


def test_ties_prefer_fewer_bytes_then_the_older_version():
    assert decide([C(1, 30.0, 100), C(2, 30.0, 90)], None, best()).champion == 2
    assert decide([C(3, 30.0, 90), C(2, 30.0, 90)], None, best()).champion == 2


def test_default_rule_takes_the_smallest_version_within_the_tolerance():
    # KLD, saved bytes: v1 is the biggest and best, v3 the smallest within 0.35, v4 smaller but too far.
    cands = [C(1, 0.20, 120), C(2, 0.32, 111), C(3, 0.34, 108), C(4, 0.70, 107)]
    d = decide(cands, None, within())
    assert (d.action, d.champion) == ("promote", 3)
    assert "smallest version within the tolerance" in d.reason and "103.0 MiB" not in d.reason
    assert decide(cands, None, within(tolerance=0.8)).champion == 4
    assert decide(cands, None, best(metric="kld_wikitext2")).champion == 1  # no tolerance: the biggest wins


def test_with_none_within_the_tolerance_the_closest_to_the_base_wins():
    d = decide([C(1, 0.50, 120), C(2, 0.90, 100)], None, within(tolerance=0.1))
    assert d.champion == 1 and "no version has kld_wikitext2 within 0.1" in d.reason


def test_a_smaller_version_within_the_tolerance_replaces_the_champion_by_size():
    cands = [C(1, 0.20, 1000), C(2, 0.30, 800)]
    d = decide(cands, 1, within())
    assert (d.action, d.champion, d.previous) == ("promote", 2, 1) and d.improvement_pct == pytest.approx(20.0)
    # 0.5% smaller only: below min_improvement_pct, the champion stays
    assert decide([C(1, 0.20, 1000), C(2, 0.30, 995)], 1, within(min_improvement_pct=1.0)).action == "keep"


def test_a_champion_outside_the_tolerance_gives_way_to_one_within():
    d = decide([C(1, 0.50, 900), C(2, 0.30, 1000)], 1, within())
    assert (d.action, d.champion) == ("promote", 2) and "outside the tolerance" in d.reason


# --- against a real registry ---------------------------------------------------------------------

PPL = {"metric": "ppl_wikitext2", "tolerance": None}

@pytest.fixture(scope="module")
def store(tmp_path_factory):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    exp = client.create_experiment("quant/Tiny", artifact_location=str(root / "artifacts"))
    return uri, client, exp


def _add_version(client, exp, model, ppl, saved, method="sensiboost", load_check="passed"):
    run = client.create_run(exp, run_name=f"hqq/{method}/4.25", tags={"mlflow.parentRunId": "x"})
    rid = run.info.run_id
    client.log_metric(rid, "ppl_wikitext2", ppl)
    client.log_metric(rid, "saved_bytes", saved)
    client.set_terminated(rid)
    tags = {"method": method, "backend": "hqq", "ppl_wikitext2": str(ppl), "saved_bytes": str(int(saved)), "run_id": rid,
            **({"load_check": load_check} if load_check else {})}
    return str(client.create_model_version(model, source=f"{run.info.artifact_uri}/model", run_id=rid, tags=tags).version)


class _WriteCounter:
    """Counts every registry write promotion could make."""

    NAMES = ("set_model_version_tag", "set_registered_model_tag", "set_registered_model_alias",
             "delete_model_version_tag", "delete_registered_model_tag", "delete_registered_model_alias",
             "delete_model_version", "delete_registered_model", "delete_run")

    def __init__(self, monkeypatch):
        from mlflow import MlflowClient

        self.calls = []
        for name in self.NAMES:
            original = getattr(MlflowClient, name)

            def wrapper(client, *a, _name=name, _orig=original, **k):
                self.calls.append(_name)
                return _orig(client, *a, **k)

            monkeypatch.setattr(MlflowClient, name, wrapper)


def test_promotion_moves_the_alias_records_why_and_is_idempotent(store, monkeypatch):
    from tasks.registry.promotion import run_promotion

    uri, client, exp = store
    model = "Tiny-quant"
    client.create_registered_model(model)
    v1 = _add_version(client, exp, model, 30.0, 1000)
    v2 = _add_version(client, exp, model, 28.0, 3000)  # best but too big for the cap below
    v3 = _add_version(client, exp, model, 29.0, 1500)

    first = run_promotion(uri, model, **PPL, max_saved_bytes=2000)
    assert first["action"] == "promote" and first["champion"] == v3 and first["changed"]
    assert str(client.get_model_version_by_alias(model, "champion").version) == v3
    note = client.get_model_version(model, v3).description
    assert note.startswith("**Champion** since") and first["reason"] in note and "saved size <= 2000 bytes" in note
    assert f"`champion` = v{v3}" in client.get_registered_model(model).description

    writes = _WriteCounter(monkeypatch)
    second = run_promotion(uri, model, **PPL, max_saved_bytes=2000)
    assert second["action"] == "keep" and not second["changed"] and second["champion"] == v3
    assert writes.calls == []  # nothing written when nothing changed
    assert client.get_model_version(model, v3).description == note

    # A slightly better version: kept out by the 1% threshold. A clearly better one: promoted.
    v4 = _add_version(client, exp, model, 28.9, 1200)
    assert run_promotion(uri, model, **PPL, max_saved_bytes=2000)["action"] == "keep"
    assert writes.calls == []
    v5 = _add_version(client, exp, model, 27.0, 1800)
    third = run_promotion(uri, model, **PPL, max_saved_bytes=2000)
    assert (third["action"], third["champion"], third["previous_champion"]) == ("promote", v5, v3)
    assert not [c for c in writes.calls if c.startswith("delete")]
    assert str(client.get_model_version_by_alias(model, "champion").version) == v5
    assert f"after v{v3}" in client.get_model_version(model, v5).description
    old = client.get_model_version(model, v3).description
    assert old.startswith("**Former champion**") and f"superseded by v{v5}" in old  # history kept
    assert len(client.search_model_versions(f"name='{model}'")) == 5  # nothing deleted
    assert {v1, v2, v4}.isdisjoint({third["champion"]})


def test_only_versions_that_passed_the_reload_check_become_champion(store):
    from tasks.registry.promotion import run_promotion

    uri, client, exp = store
    model = "Checked-quant"
    client.create_registered_model(model)
    broken = _add_version(client, exp, model, 20.0, 1000, load_check="failed")  # the best, but it does not reload
    unchecked = _add_version(client, exp, model, 21.0, 1000, load_check=None)
    ok = _add_version(client, exp, model, 25.0, 1000)
    decision = run_promotion(uri, model, **PPL)
    assert decision["champion"] == ok and decision["eligible"] == 1 and decision["considered"] == 3
    assert {broken, unchecked}.isdisjoint({decision["champion"]})


def test_no_eligible_version_and_unknown_model_are_errors(store):
    from tasks.registry.promotion import run_promotion

    uri, client, exp = store
    client.create_registered_model("Small-quant")
    _add_version(client, exp, "Small-quant", 30.0, 5000)
    with pytest.raises(PipelineError, match="no eligible version"):
        run_promotion(uri, "Small-quant", **PPL, max_saved_bytes=100)
    with pytest.raises(PipelineError, match="does not exist"):
        run_promotion(uri, "Nope-quant")


def test_cli_prints_one_line(store, capsys):
    from tasks.__main__ import main

    uri, client, exp = store
    client.create_registered_model("Cli-quant")
    v = _add_version(client, exp, "Cli-quant", 31.5, 700)
    assert main(["promote", "--tracking-uri", uri, "--model", "Cli-quant", "--max-bytes", "1000", "--metric", "ppl_wikitext2", "--best"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"promote: Cli-quant@champion = v{v}") and "\n" not in out
    assert main(["promote", "--tracking-uri", uri, "--model", "Cli-quant", "--max-bytes", "10", "--metric", "ppl_wikitext2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no eligible version") and "\n" not in err
