"""mlflow/CONVENTIONS.md says what the code writes: names, tags, key metrics, artifacts, the promotion
rule's defaults. Each check reads the names from the code and looks for them in the document, so
renaming one side without the other fails here. (The slow pipeline tests check the same names on a
real store: tests/test_mlflow_model.py.)"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.orchestration.config import PROMOTE_METRICS, PipelineConfig
from tasks.allocation.plan import variant_name
from tasks.allocation.plan import BASELINE_METHOD
from tasks.registry import naming, promotion, tracking, ui, versions

DOC = (Path(__file__).resolve().parent.parent / "mlflow" / "CONVENTIONS.md").read_text()


def _section(title: str) -> str:
    start = DOC.index(f"## {title}")
    end = DOC.find("\n## ", start + 1)
    return DOC[start : end if end > 0 else None]


def _bullet(text: str, lead: str) -> str:
    """The bullet starting with `lead`, with its continuation lines."""
    start = text.index(f"- {lead}")
    end = text.find("\n- ", start + 1)
    return text[start : end if end > 0 else None]


def test_version_tags_are_the_fixed_set_the_code_writes():
    bullet = _bullet(_section("Registered models and versions"), "Version tags")
    documented = re.findall(r"`([a-z_0-9]+)`", bullet.split("after the reload check")[0])
    assert documented == list(versions.VERSION_TAGS)
    tags = versions.version_tags("hqq/uniform/4.25", "uniform", "hqq", {"nominal_bpp": 4.25, "saved_bytes": 2**20,
                                 "kld_wikitext2": 0.2, "ppl_wikitext2": 20.0}, "sha256:x", "mlflow pyfunc")  # fmt: skip
    assert set(tags) == set(versions.VERSION_TAGS)


def test_key_metrics_and_the_runs_view_columns_are_documented():
    full = {name: 1.0 for name in tracking.KEY_METRICS.values()} | {"saved_bytes": 2**20}
    keys = tracking.key_metrics(full)
    section = _section("Experiments and runs")
    for key in keys:
        assert f"`{key}`" in section, key
    assert {f"{tracking.KEY_PREFIX}{c}" for c in ui.KEY_COLUMNS} <= set(keys)


def test_names_and_artifacts():
    section = _section("Experiments and runs")
    assert naming.parent_run_name(1796592600) in section  # 2026-12-06T21:30:00Z
    assert re.sub(r"\d+", "<n>", naming.profile_run_name("<base model>", 1, 2)).replace("<n> x <n>", "<samples> x <seq_len>") in section
    assert f"`{variant_name('none', BASELINE_METHOD, 'fp32')}`" in section
    for name in (naming.BITMAP_JSON, naming.BITMAP_PNG, naming.MANIFEST_JSON, naming.EVALUATION_JSON):
        assert f"`{name}`" in section, name
    assert tracking.logged_model_name("hqq/optimal/3.25@SB30") in section
    assert tracking.LOGGED_MODEL_TYPE in section
    assert f"{tracking.EXPERIMENT_KIND_TAG}={tracking.EXPERIMENT_KIND}" in section
    for key, value in tracking.SOURCE_TAGS.items():
        assert f"{key}={value}" in section


def test_links_and_the_promotion_defaults():
    links = _section("Links into the UI")
    assert ui.WORKFLOW_QUERY in links and ui.SHARED_VIEW_TAG_PREFIX in links
    rule = _section("The `champion` alias and promotion")
    default = PipelineConfig()
    assert (default.promote_metric, default.promote_tolerance) == (promotion.DEFAULT_METRIC, promotion.DEFAULT_TOLERANCE)
    assert f"{promotion.DEFAULT_METRIC} <= {promotion.DEFAULT_TOLERANCE:g}" in rule
    for metric in PROMOTE_METRICS:
        assert metric.split("_")[0] in rule
