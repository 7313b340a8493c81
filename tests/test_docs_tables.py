"""Every generated table in README.md and docs/ equals what its generator writes now from the stored
result (docs/results/) or the code (the Params table from PipelineConfig): no number is copied by hand,
and a changed default or a new run's stored result without `python -m tasks docs` fails here."""

from __future__ import annotations

import pytest

from tasks.reports import docs_tables
from tasks.settings import REPO_ROOT


@pytest.mark.parametrize("where", sorted(docs_tables.blocks()), ids=lambda w: f"{w[0]}:{w[1]}")
def test_the_block_is_what_its_generator_writes(where):
    rel, name = where
    text = (REPO_ROOT / rel).read_text()
    assert docs_tables.current(text, name) == docs_tables.blocks()[where](), f"{rel} '{name}' is stale: run python -m tasks docs"


def test_render_replaces_only_the_block():
    text = "intro\n<!-- BEGIN t: generated -->\nold\n<!-- END t -->\noutro"
    assert docs_tables.render(text, "t", "new\nrows") == "intro\n<!-- BEGIN t: generated -->\nnew\nrows\n<!-- END t -->\noutro"
    with pytest.raises(SystemExit, match="no block 'u'"):
        docs_tables.render(text, "u", "x")
