"""The MLflow UI as a user opens it after a pipeline run, in headless Chromium: the links the run prints
open the experiment in "Model training" mode on the runs table with the variants' key metric columns,
the champion's version page says why it won, the Models tab lists a logged model per quantized variant,
and a variant run shows its bit-map image. The pages come from scripts/mlflow_ui_pages.py, the same
script that takes the README's screenshots from a `make run` store."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import CHROMIUM, pipeline_in_own_state

pytestmark = [pytest.mark.slow,  # a pipeline run, an MLflow server and a browser
              pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")]  # fmt: skip

REPO = Path(__file__).resolve().parent.parent
CONF = {"backends": ["hqq"], "uniform_budgets": ["b4g64", "b3g128"], "methods": ["sensiboost", "optimal"], "budgets": ["b3g64"], "calibration_samples": 4,
        "calibration_seq_len": 128, "fisher_samples": 2, "eval_tokens": 1024, "lm_eval_tasks": []}  # fmt: skip


@pytest.fixture(scope="module")
def pages(tmp_path_factory, request):
    """The pages of a tiny pipeline run of its own; with QUANT_UI_HOME=<a QUANT_HOME>, those of that
    home's latest run instead (e.g. `QUANT_UI_HOME=.state` after `make run`: the embedded run's store)."""
    if os.environ.get("QUANT_UI_HOME"):
        state = Path(os.environ["QUANT_UI_HOME"]).resolve()
        env = {**os.environ, "QUANT_HOME": str(state), "MLFLOW_TRACKING_URI": f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"}
    else:
        state = tmp_path_factory.mktemp("ui-state")
        env = pipeline_in_own_state(state, {**CONF, "model": str(request.getfixturevalue("tiny_model_dir"))})
    out = tmp_path_factory.mktemp("ui-pages")
    shot = subprocess.run([sys.executable, "scripts/mlflow_ui_pages.py", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    assert shot.returncode == 0, shot.stdout[-2000:] + shot.stderr[-3000:]
    results = json.loads((state / "reports" / "latest" / "results.json").read_text())
    return {name: (out / f"{name}.html").read_text() for name in ("runs", "compare", "champion", "models", "bitmap")}, results


def _text(dom: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))


def test_the_runs_link_opens_the_runs_table_with_the_key_metric_columns(pages):
    dom, results = pages
    text = _text(dom["runs"])
    assert "Model training" in text and "Traces overview" not in text
    for row in results:
        assert row["variant"] in text, row["variant"]  # every variant, none collapsed under its parent
    for column in ("key/bpp", "key/size_mib", "key/kld_wikitext2", "key/ppl_wikitext2"):
        assert column in text, column
    assert f"{len(results)} matching runs" in text
    assert "Duration" in text and "Models" in text


def test_the_champion_version_says_why_it_won(pages):
    dom, results = pages
    champion = next(r for r in results if r.get("champion"))
    text = _text(dom["champion"])
    assert "Champion since" in text and ("smallest version within the tolerance" in text or "no version has" in text)
    assert champion["variant"] in text and "champion" in text


def test_a_logged_model_per_quantized_variant(pages):
    from tasks.registry.tracking import logged_model_name

    dom, results = pages
    text = _text(dom["models"])
    for row in results:
        if row["backend"] != "none":
            assert logged_model_name(row["variant"]) in text, row["variant"]


def test_a_variant_run_shows_its_bit_map_image_and_the_compare_page_its_runs(pages):
    dom, results = pages
    assert "bitmap.png" in dom["bitmap"] and "<img" in dom["bitmap"]
    compare = _text(dom["compare"])
    assert f"Comparing {len(results)} Runs" in compare and "Something went wrong" not in compare
    assert "evaluation.json" in compare  # the file every run has, side by side
