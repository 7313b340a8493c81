"""Every generated table in README.md and docs/ equals what its generator writes now from the stored
result (docs/results/) or the code (the Params table from PipelineConfig): no number is copied by hand,
and a changed default or a new run's stored result without `python -m tasks docs` fails here. Every
`Measured by:` line sits in a generated block, and every benchmark a block names can write its own result
(`--write-docs`)."""

from __future__ import annotations

import ast
import json
import re
import shutil

import pytest

from tasks.reports import benchmark_tables, docs_tables
from tasks.settings import REPO_ROOT

FOUND = docs_tables.found_blocks()


@pytest.mark.parametrize("where", FOUND, ids=lambda w: f"{w[0]}:{w[1]}")
def test_the_block_is_what_its_generator_writes(where):
    rel, name = where
    assert where in docs_tables.blocks(), f"{rel} has a block '{name}' that nothing writes (tasks/reports/docs_tables.py blocks())"
    text = (REPO_ROOT / rel).read_text()
    assert docs_tables.current(text, name) == docs_tables.blocks()[where](), f"{rel} '{name}' is stale: run python -m tasks docs"


@pytest.mark.parametrize("where", sorted(docs_tables.blocks()), ids=lambda w: f"{w[0]}:{w[1]}")
def test_every_block_is_in_its_file_once(where):
    rel, name = where
    lines = (REPO_ROOT / rel).read_text().splitlines()
    begins = [i for i, line in enumerate(lines) if line.startswith(f"<!-- BEGIN {name}: ") and line.endswith("-->")]
    ends = [i for i, line in enumerate(lines) if line == f"<!-- END {name} -->"]
    assert len(begins) == 1 and len(ends) == 1 and begins[0] < ends[0], f"{rel}: the markers of '{name}'"


@pytest.mark.parametrize("where", FOUND, ids=lambda w: f"{w[0]}:{w[1]}")
def test_a_hand_edited_number_in_a_block_is_detected(where):
    rel, name = where
    body = docs_tables.current((REPO_ROOT / rel).read_text(), name)
    # the first digit of the block's first table row (not a header or a date)
    first_row = next(i for i, line in enumerate(body.splitlines()) if line.startswith("|") and re.search(r"\d", line) and "---" not in line)
    lines = body.splitlines()
    lines[first_row] = re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), lines[first_row], count=1)
    edited = "\n".join(lines)
    assert edited != body
    assert edited != docs_tables.blocks()[where]()


def test_every_measured_by_line_is_in_a_generated_block():
    loose = []
    for rel in sorted({rel for rel, _ in FOUND} | {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs").glob("*.md")} | {"README.md"}):
        inside = False
        for n, line in enumerate((REPO_ROOT / rel).read_text().splitlines(), 1):
            if line.startswith("<!-- BEGIN "):
                inside = True
            elif line.startswith("<!-- END "):
                inside = False
            elif "Measured by" in line and not inside:
                loose.append(f"{rel}:{n}: {line[:80]}")
    assert not loose, "results copied by hand (store them in docs/results/ and render them: tasks/reports/benchmark_tables.py):\n" + "\n".join(loose)


def _accepts_write_docs(script) -> bool:
    tree = ast.parse(script.read_text())
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
               and any(isinstance(a, ast.Constant) and a.value == "--write-docs" for a in node.args)
               for node in ast.walk(tree))  # fmt: skip


def _stored_commands() -> list[str]:
    return [benchmark_tables.load(n)["command"] for _, names, _ in benchmark_tables.BLOCKS.values() for n in names]


def test_every_benchmark_a_block_names_accepts_write_docs():
    named = sorted({m for command in _stored_commands() for m in re.findall(r"\bbenchmarks/(\w+\.py)\b", command)})
    assert named, "no stored result names a benchmark: the command pattern no longer matches"
    missing = [n for n in named if not (REPO_ROOT / "benchmarks" / n).exists() or not _accepts_write_docs(REPO_ROOT / "benchmarks" / n)]
    assert not missing, f"benchmarks whose tables are in the docs but that cannot write them (--write-docs): {missing}"


def test_every_stored_result_says_where_it_was_measured():
    for _, names, _ in benchmark_tables.BLOCKS.values():
        for name in names:
            result = benchmark_tables.load(name)
            assert result["command"] and result["machine"] and result["rows"], name
            assert re.fullmatch(r"[0-9a-f]{40}", result["commit"]), f"{name}: commit {result['commit']!r}"


def test_write_docs_stores_the_result_and_rewrites_its_block(tmp_path, monkeypatch):
    """A benchmark's --write-docs with made-up rows, on a copy of its page: the stored result has the command
    line (without --write-docs), this checkout's commit and this machine, and the block shows the rows."""
    (tmp_path / "docs" / "results").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "docs" / "architectures.md", tmp_path / "docs" / "architectures.md")
    monkeypatch.setattr(docs_tables, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(benchmark_tables, "RESULTS", tmp_path / "docs" / "results")
    rows = [{"ties": "free", "budget": 3.25, "reached": 3.2499, "solve_s": 1.234, "status": "optimal", "lp_gap": 1.5e-7},
            {"ties": "tie_experts", "budget": 3.25, "reached": 3.2498, "solve_s": 0.25, "status": "optimal", "lp_gap": None}]
    written = docs_tables.write_benchmark_docs("moe-solve-time", rows, tmp_path / "benchmarks" / "moe_solve_time.py",
                                               ["--budgets", "3.25", "--write-docs"], machine="3 CPU cores, no GPU")  # fmt: skip
    assert written == [tmp_path / "docs" / "results" / "moe-solve-time.json", tmp_path / "docs" / "architectures.md"]
    stored = json.loads(written[0].read_text())
    head = docs_tables._git("rev-parse", "HEAD")
    assert stored["command"] == "python benchmarks/moe_solve_time.py --budgets 3.25"
    assert stored["commit"] == head and stored["machine"] == "3 CPU cores, no GPU" and stored["rows"] == rows
    block = docs_tables.current(written[1].read_text(), "moe-solve-time")
    assert "| free | 3.25 | 1.2 s | optimal (proven) | 1.5e-7 |" in block
    assert "| `tie_experts` | 3.25 | 0.2 s | optimal (proven) | - |" in block
    assert block.endswith(f"Measured by: `python benchmarks/moe_solve_time.py --budgets 3.25` at {head[:7]}"
                          f"{' with uncommitted changes' if stored.get('dirty') else ''}, 3 CPU cores, no GPU.")  # fmt: skip
    assert docs_tables.write_all({"moe-solve-time"}) == []  # written once, then stable


def test_the_host_machine_names_cores_and_gpu():
    assert re.fullmatch(r"\d+ CPU cores, (no GPU|\d+ x .+)", docs_tables.host_machine())


def test_render_replaces_only_the_block():
    text = "intro\n<!-- BEGIN t: generated -->\nold\n<!-- END t -->\noutro"
    assert docs_tables.render(text, "t", "new\nrows") == "intro\n<!-- BEGIN t: generated -->\nnew\nrows\n<!-- END t -->\noutro"
    with pytest.raises(SystemExit, match="no block 'u'"):
        docs_tables.render(text, "u", "x")


def test_the_rival_table_gives_each_optimal_flavor_a_column():
    from tasks.reports.benchmark_tables import rival_allocators

    def row(name, ppl, kld, se=0.01):
        return {"name": name, "bpp": 3.25, "ppl_wikitext2": ppl, "kld_wikitext2": kld, "kld_wikitext2_se": se}

    result = {"command": "python benchmarks/rival_allocators.py", "commit": "abc1234", "machine": "2 cores", "rows": [
        row("uniform 3.25", 159.3, 2.072), row("optimal 3.25", 45.4, 0.859), row("optimal[per_token] 3.25", 44.4, 0.846),
        row("optimal[per_token+refine] 3.25", 40.0, 0.700), row("taylor 3.25", 44.4, 0.846), row("SB30 3.25", 84.1, 1.423),
        row("optimal @SB30 3.25", 37.4, 0.676), row("optimal[per_token+refine] @SB30 3.25", 36.0, 0.650)]}  # fmt: skip
    head, _, line = rival_allocators(result).splitlines()[:3]
    assert "| `optimal` | `optimal[per_token+refine]` | `optimal[per_token]` | `taylor` (ModelOpt) |" in head
    assert "**40.0 / 0.700** ±.010" in line  # the lowest, by more than the combined standard error
    assert line.rstrip(" |").endswith("84.1 / 1.423 ; 37.4 / 0.676 ; **36.0 / 0.650** ; -")
