"""The README and the docs/ pages hold together: every relative link and image of README.md and docs/*.md
points to a file that exists (and, into a markdown file, to a heading it has), the README links every docs
page and stays a five-minute read, and the generated blocks' markers are in place. Reads text only."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 160  # 150 written by hand, plus the generated summary table

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
COMMENT = re.compile(r"<!--.*?-->", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_SRC = re.compile(r"<(?:img|a)\b[^>]*?\b(?:src|href)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)
MARKERS = [
    ("README.md", "<!-- BEGIN embedded-run summary: written by python -m tasks docs, do not edit -->",
     "<!-- END embedded-run summary -->"),
    ("docs/results.md", "<!-- BEGIN embedded-run table: written by python -m tasks docs, do not edit -->",
     "<!-- END embedded-run table -->"),
    ("docs/configuration.md", "<!-- BEGIN params: written by python -m tasks docs, do not edit -->",
     "<!-- END params -->"),
]


def _prose(text: str) -> str:
    """The text without fenced code blocks, comments and code spans (a code span stays as a placeholder, so
    that a link whose text is code, [`x`](x), is still a link)."""
    text = FENCE.sub("", text)
    text = COMMENT.sub("", text)
    return CODE_SPAN.sub("code", text)


def links(path: Path) -> list[str]:
    prose = _prose(path.read_text())
    return LINK.findall(prose) + HTML_SRC.findall(prose)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped (word characters, '-' and ' ' kept), spaces
    to '-', a repeated anchor numbered -1, -2, ...; plus explicit id/name attributes."""
    text = FENCE.sub("", path.read_text())
    seen: dict[str, int] = {}
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    for title in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", text, re.M):
        title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading counts by its text
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _where(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("page", PAGES, ids=_where)
def test_every_relative_link_and_image_points_to_an_existing_file(page):
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
        elif not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {_where(dest)}")
    assert not broken, f"{_where(page)}:\n  " + "\n  ".join(broken)


def test_the_readme_is_short_and_links_every_docs_page():
    readme = REPO / "README.md"
    assert links(readme), "README.md has no links at all: the link pattern no longer matches"
    lines = readme.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"
    linked = {(REPO / t.partition("#")[0]).resolve() for t in links(readme) if not SCHEME.match(t)}
    missing = [_where(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


@pytest.mark.parametrize("where,begin,end", MARKERS, ids=[m[0] for m in MARKERS])
def test_the_generated_blocks_markers_are_in_place(where, begin, end):
    lines = (REPO / where).read_text().splitlines()
    assert lines.count(begin) == 1 and lines.count(end) == 1, where
    assert lines.index(begin) < lines.index(end), where
