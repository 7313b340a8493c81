"""Every `make run CONF='...'` example of the README (and of docs/*.md) passes the pre-flight's config
validation and plans at least one quantized variant: the Params' checks (`PipelineConfig.from_dict`) and the
planning that `python -m tasks pipeline --check` prints, without the model. The examples' models are
replaced by the embedded one: a hub id needs a network and `/models/...` is a placeholder path, neither of
which exists here (the model's files are the pre-flight's other half, tested in test_preflight.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.orchestration.config import PipelineConfig
from tasks.orchestration.preflight import plan_lines, planned_variants

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"make run CONF='([^']*)'")


def _examples() -> list[tuple[str, str]]:
    out = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            out += [(f"{path.relative_to(REPO)}:{n}", conf) for conf in EXAMPLE.findall(line)]
    return out


EXAMPLES = _examples()


def test_the_readme_has_examples():
    assert any(where.startswith("README.md") for where, _ in EXAMPLES)
    assert any("budgets" in conf for _, conf in EXAMPLES), "the example with budgets is among them"


@pytest.mark.parametrize("where,conf", EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_a_documented_config_passes_preflight_and_quantizes_something(where, conf):
    config = json.loads(conf)
    assert isinstance(config, dict), where
    config["model"] = "embedded"  # the example's hub id or placeholder path cannot be resolved here
    config.pop("revision", None)  # a hub revision, meaningless for the embedded model
    cfg = PipelineConfig.from_dict(config)
    rows = planned_variants(cfg, "llama")  # the embedded model is a llama
    assert any(r["backend"] != "none" and not r["skipped"] for r in rows), (where, rows)
    assert not any(line.startswith("note:") for line in plan_lines(cfg, "llama")), where
