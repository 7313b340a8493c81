"""The documentation's generated tables: written from stored results and from the code, never by hand.

    python -m tasks docs                       rewrite every generated block in README.md and docs/
    python -m tasks docs --embedded DIR        first store a `make run`'s reports (DIR: .state/reports/latest) as
                                               docs/results/embedded-run.json, with commit and machine
    python -m tasks docs --pipeline-backends DIR   first store a pipeline run's reports (the backends table's
                                               command) as docs/results/pipeline-backends.json
    python benchmarks/<name>.py ... --write-docs   a benchmark stores its own result (docs/results/<name>[-variant].json,
                                               write_benchmark_docs) and rewrites the blocks that read it

A generated block sits between `<!-- BEGIN <name>: ... -->` and `<!-- END <name> -->` in a markdown file;
`blocks()` says which file holds which block and what writes it (the benchmarks' tables:
tasks/reports/benchmark_tables.py). tests/test_docs_tables.py checks that every block equals what its
generator writes now, so a number in the docs always has its source.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

from tasks.reports import benchmark_tables
from tasks.settings import REPO_ROOT

EMBEDDED = REPO_ROOT / "docs" / "results" / "embedded-run.json"
PAGES = ("README.md", "docs/*.md")  # where generated blocks may sit
BEGIN = re.compile(r"^<!-- BEGIN (.+?): [^\n]*-->$", re.M)


def blocks() -> dict[tuple[str, str], object]:
    """(file relative to the repository, block name) -> the function that writes the block's body."""
    return {
        ("README.md", "embedded-run summary"): embedded_summary,
        ("docs/results.md", "embedded-run table"): embedded_table,
        ("docs/configuration.md", "params"): params_table,
        **{(rel, name): benchmark_tables.writer(name) for name, (rel, _, _) in benchmark_tables.BLOCKS.items()},
    }


def found_blocks(root: Path | None = None) -> list[tuple[str, str]]:
    """(file, block name) of every BEGIN marker in README.md and docs/*.md, as the files have them."""
    root = root or REPO_ROOT
    paths = [p for pattern in PAGES for p in sorted(root.glob(pattern))]
    return [(p.relative_to(root).as_posix(), name) for p in paths for name in BEGIN.findall(p.read_text())]


def _stored() -> dict:
    return json.loads(EMBEDDED.read_text())


def _provenance(run: dict) -> str:
    return (f"Measured by `{run['command']}` on a fresh clone at commit `{run['commit']}` ({run['date']}, {run['machine']}; "
            f"the DAG took {run['duration_s'] / 60:.0f} min); stored in `docs/results/embedded-run.json`.")  # fmt: skip


def embedded_summary() -> str:
    """The README's small table: what each variant is, how big, how close to the base model, whether it reloads."""
    from tasks.quantize.registry import runtimes
    from tasks.registry.mlflow_model import serving
    from tasks.reports.table import format_cell, markdown

    run = _stored()
    engines = [(prefix, name) for prefix, name in runtimes() if any(r.get(f"{prefix}_kld_wikitext2") is not None for r in run["rows"])]
    head = ["#", "variant", "bpp", "saved MiB", "WikiText-2 KLD", *(f"KLD in {name}" for _, name in engines), "WikiText-2 ppl", "reload", "served by"]
    cells = []
    for i, r in enumerate(run["rows"], 1):
        name = f"**{r['variant']}** (champion)" if r.get("champion") else r["variant"]
        cells.append([str(i), name, format_cell(r.get("nominal_bpp"), "{:.3f}"), format_cell((r.get("saved_bytes") or 0) / 2**20 or None, "{:.1f}"),
                      format_cell(r.get("kld_wikitext2"), "{:.4f}"), *(format_cell(r.get(f"{p}_kld_wikitext2"), "{:.4f}") for p, _ in engines),
                      format_cell(r.get("ppl_wikitext2"), "{:.2f}"), format_cell(r.get("load_check"), "{}"),
                      serving(r["backend"]) if r["backend"] != "none" else "-"])  # fmt: skip
    table = markdown(head, cells, [True, False, True, True, True, *(True for _ in engines), True, False, False])
    return f"{table}\n\n{run['champion']}\n\n{_provenance(run)}"


def embedded_table() -> str:
    """The full results table `make run` prints, with its noise and agreement lines."""
    from tasks.reports.table import results_table

    run = _stored()
    return "\n\n".join([results_table(run["rows"]), run["champion"], *run["summary"], _provenance(run)])


def params_table() -> str:
    """Every Param of PipelineConfig: name, default, title and description, in the dataclass's order."""
    from tasks.orchestration.config import PipelineConfig, param_specs

    specs = param_specs()
    rows = []
    for f in fields(PipelineConfig):
        spec = specs[f.name]
        default = json.dumps(spec["default"])
        meaning = spec["title"] + (f": {spec['description']}" if spec.get("description") else "")
        rows.append(f"| `{f.name}` | `{default}` | {meaning.replace('|', '/')} |")
    return "\n".join(["| Param | default | meaning |", "|---|---|---|", *rows])


def render(text: str, name: str, body: str) -> str:
    """`text` with the block `name` replaced by `body` (the markers stay)."""
    pattern = re.compile(rf"(<!-- BEGIN {re.escape(name)}:[^\n]*-->\n)(.*?)(\n<!-- END {re.escape(name)} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"error: no block '{name}' (<!-- BEGIN {name}: ... --> ... <!-- END {name} -->)")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text, count=1)


def current(text: str, name: str) -> str | None:
    m = re.search(rf"<!-- BEGIN {re.escape(name)}:[^\n]*-->\n(.*?)\n<!-- END {re.escape(name)} -->", text, re.S)
    return m.group(1) if m else None


def write_all(only: set[str] | None = None) -> list[Path]:
    """Rewrite every block (or only the blocks named in `only`); the files that changed."""
    written = []
    for (rel, name), make in blocks().items():
        if only is not None and name not in only:
            continue
        path = REPO_ROOT / rel
        new = render(path.read_text(), name, make())
        if new != path.read_text():
            path.write_text(new)
            written.append(path)
    return written


def store_embedded(reports: Path, duration_s: float, commit: str | None = None, command: str = "make run") -> Path:
    """A run's reports (results.json, results.md) as the docs' stored result, with where it was measured."""
    rows = json.loads((reports / "results.json").read_text())
    parts = (reports / "results.md").read_text().strip().split("\n\n")
    champion = next((p for p in parts if p.startswith("Champion:")), "")
    summary = [p for p in parts[1:] if p != champion]
    commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    keep = ("run_id",)  # differs on every run; nothing reads it here
    record = {
        "command": command,
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {_cores()} cores, {platform.python_version()}",
        "duration_s": duration_s,
        "champion": champion,
        "summary": summary,
        "rows": [{k: v for k, v in r.items() if k not in keep} for r in rows],
    }
    EMBEDDED.parent.mkdir(parents=True, exist_ok=True)
    EMBEDDED.write_text(json.dumps(record, indent=1) + "\n")
    return EMBEDDED


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def host_machine() -> str:
    """This machine in the docs' words: its CPU cores and its GPU, e.g. '2 CPU cores, no GPU'."""
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{_cores()} CPU cores, {gpu}"


def _git(*args: str) -> str:
    """git in the checkout this code runs from."""
    return subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True).stdout.strip()


def _plain(value):
    """numpy scalars and paths as JSON values."""
    return value.item() if hasattr(value, "item") else str(value)


def write_benchmark_docs(name: str, rows: list[dict], script: str | Path, argv: list[str] | None = None,
                         machine: str | None = None) -> list[Path]:  # fmt: skip
    """A benchmark's `--write-docs`: store its rows as docs/results/<name>.json with the command line that
    measured them (`script` and `argv`, default sys.argv[1:], without --write-docs), this checkout's commit
    and this machine, then rewrite the docs blocks that read that result. Returns the files written."""
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--write-docs"]
    script = Path(script).resolve()
    where = script.relative_to(REPO_ROOT).as_posix() if script.is_relative_to(REPO_ROOT) else str(script)
    record = {
        "command": shlex.join(["python", where, *argv]),
        "commit": _git("rev-parse", "HEAD"),
        "machine": machine or host_machine(),
        "date": time.strftime("%Y-%m-%d"),
        **({"dirty": True} if _git("status", "--porcelain", "--untracked-files=no") else {}),
        "rows": rows,
    }
    path = benchmark_tables.result_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=_plain, ensure_ascii=False) + "\n")
    readers = benchmark_tables.blocks_reading(name)
    if not readers:
        print(f"note: no docs block reads {name}; stored {path} only", file=sys.stderr)
    return [path, *write_all(set(readers))]


BACKENDS_COMMAND = ("python -m tasks pipeline --config '{\"backends\": [\"hqq\",\"gptq\",\"awq\",\"bnb\"], \"uniform_budgets\": [\"b4g64\"], "
                    "\"methods\": [\"kurtboost\"], \"budgets\": [\"b4g64\"]}'")  # fmt: skip


def store_pipeline_backends(reports: Path) -> Path:
    """A run of BACKENDS_COMMAND (its reports directory) as docs/results/pipeline-backends.json."""
    rows = benchmark_tables.pipeline_backends_rows(json.loads((reports / "results.json").read_text()))
    path = benchmark_tables.result_path("pipeline-backends")
    record = {"command": BACKENDS_COMMAND, "commit": _git("rev-parse", "HEAD"), "machine": host_machine(), "date": time.strftime("%Y-%m-%d"),
              "rows": rows}  # fmt: skip
    path.write_text(json.dumps(record, indent=1, default=_plain, ensure_ascii=False) + "\n")
    return path
