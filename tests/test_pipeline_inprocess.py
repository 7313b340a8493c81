"""Every allocator through the in-process pipeline on a tiny real checkpoint: profiling, allocation,
HQQ quantization, evaluation and MLflow, with the same steps the DAG runs."""

import json

import pytest

from tasks.allocation.methods import METHODS
from tasks.orchestration.runner import run_inprocess

pytestmark = pytest.mark.slow  # a whole pipeline with every allocator, and a reload check per version


def test_all_methods_run_and_respect_their_budgets(state, tiny_model_dir):
    from mlflow import MlflowClient

    result = run_inprocess(
        {
            "model": str(tiny_model_dir),
            "backends": ["hqq"],
            "uniform_budgets": ["b3g64"],
            "methods": [m for m, spec in METHODS.items() if spec.scored],  # (uniform and llama.cpp's presets are not methods of budgets)
            "budgets": ["b3g64"],
            "calibration_samples": 4,
            "calibration_seq_len": 128,
            "eval_tokens": 1024,
            "protocols": ["paper"],
            "lm_eval_tasks": [],
        }
    )
    rows = json.loads((state / "reports" / "latest" / "results.json").read_text())
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"unquantized", "uniform", *[m for m, spec in METHODS.items() if spec.scored]}
    sb = by_method["sensiboost"]["nominal_bpp"]
    for method in ("lim", "zd", "mxq", "optimal", "taylor", "delta_loss", "dkld_greedy"):  # budget-exact, at SB30's memory
        assert by_method[method]["nominal_bpp"] <= sb + 1e-9, method
    for row in rows:
        assert row["ppl_wikitext2"] > 1
    assert "| variant" in result["table"]
    client = MlflowClient()
    versions = client.search_model_versions(f"name = '{tiny_model_dir.name}-quant'")
    # Allocations that coincide (tiny model: few outliers) share one version: one per distinct model.
    assert 1 <= len(versions) <= len(rows) - 1
    assert len({v.tags["model_hash"] for v in versions}) == len(versions)
    assert client.get_model_version_by_alias(f"{tiny_model_dir.name}-quant", "champion")

    # Another budget with the default methods: the first run's profile (which also holds the opt-in rival
    # scores) serves it, no second profile is computed.
    def profiles_on_disk():  # the stage outputs, not their lock files
        return sorted(p for p in (state / "artifacts" / "profiling").iterdir() if not p.name.startswith("."))

    profiles = profiles_on_disk()
    run_inprocess({"model": str(tiny_model_dir), "backends": ["hqq"], "uniform_budgets": [], "methods": ["optimal"], "budgets": ["3.6"],
                   "calibration_samples": 4, "calibration_seq_len": 128, "eval_tokens": 1024, "protocols": ["paper"],
                   "lm_eval_tasks": []})  # fmt: skip
    assert profiles_on_disk() == profiles and len(profiles) == 1

    # optimal priced per token and refined by the held-out KLD: the same profile again; the search runs
    # once (its own stage output) and a rerun takes its map from the cache.
    refined = {"model": str(tiny_model_dir), "backends": ["hqq"], "uniform_budgets": [], "methods": ["optimal"], "budgets": ["3.6"],
               "method_options": {"optimal": {"objective": "per_token", "refine": {"generations": 2, "offspring": 2, "stages": [127, 254]}}},
               "calibration_samples": 4, "calibration_seq_len": 128, "eval_tokens": 1024, "protocols": ["paper"], "lm_eval_tasks": []}  # fmt: skip
    run_inprocess(refined)
    searches = sorted(p for p in (state / "artifacts" / "refine").iterdir() if not p.name.startswith("."))
    assert profiles_on_disk() == profiles and len(searches) == 1
    bitmap = json.loads((searches[0] / "bitmap.json").read_text())
    assert bitmap["options"]["objective_name"] == "per_token" and bitmap["options"]["refine"]["generations_run"] == 2
    assert bitmap["options"]["refine"]["holdout_kld"] <= bitmap["options"]["refine"]["holdout_kld_start"]
    run_inprocess(refined)
    assert sorted(p for p in (state / "artifacts" / "refine").iterdir() if not p.name.startswith(".")) == searches
