"""The documentation's generated tables: written from stored results and from the code, never by hand.

    python -m tasks docs                       rewrite every generated block in README.md and docs/
    python -m tasks docs --embedded DIR        first store a `make run`'s reports (DIR: .state/reports/latest) as
                                               docs/results/embedded-run.json, with commit and machine

A generated block sits between `<!-- BEGIN <name>: ... -->` and `<!-- END <name> -->` in a markdown file;
`blocks()` says which file holds which block and what writes it. tests/test_docs_tables.py checks that
every block equals what its generator writes now, so a number in the docs always has its source.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import time
from dataclasses import fields
from pathlib import Path

from tasks.settings import REPO_ROOT

EMBEDDED = REPO_ROOT / "docs" / "results" / "embedded-run.json"


def blocks() -> dict[tuple[str, str], object]:
    """(file relative to the repository, block name) -> the function that writes the block's body."""
    return {
        ("README.md", "embedded-run summary"): embedded_summary,
        ("docs/results.md", "embedded-run table"): embedded_table,
        ("docs/configuration.md", "params"): params_table,
    }


def _stored() -> dict:
    return json.loads(EMBEDDED.read_text())


def _provenance(run: dict) -> str:
    return (f"Measured by `{run['command']}` on a fresh clone at commit `{run['commit']}` ({run['date']}, {run['machine']}; "
            f"the DAG took {run['duration_s'] / 60:.0f} min); stored in `docs/results/embedded-run.json`.")  # fmt: skip


def embedded_summary() -> str:
    """The README's small table: what each variant is, how big, how close to the base model, whether it reloads."""
    from tasks.registry.mlflow_model import serving
    from tasks.reports.table import format_cell, markdown

    run = _stored()
    head = ["#", "variant", "bpp", "saved MiB", "WikiText-2 KLD", "WikiText-2 ppl", "reload", "served by"]
    cells = []
    for i, r in enumerate(run["rows"], 1):
        name = f"**{r['variant']}** (champion)" if r.get("champion") else r["variant"]
        cells.append([str(i), name, format_cell(r.get("nominal_bpp"), "{:.3f}"), format_cell((r.get("saved_bytes") or 0) / 2**20 or None, "{:.1f}"),
                      format_cell(r.get("kld_wikitext2"), "{:.4f}"), format_cell(r.get("ppl_wikitext2"), "{:.2f}"),
                      format_cell(r.get("load_check"), "{}"), serving(r["backend"]) if r["backend"] != "none" else "-"])  # fmt: skip
    table = markdown(head, cells, [True, False, True, True, True, True, False, False])
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


def write_all() -> list[Path]:
    written = []
    for (rel, name), make in blocks().items():
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
    import os

    return len(os.sched_getaffinity(0))


def configure_parser(parser) -> None:
    parser.add_argument("--embedded", type=Path, help="store this run's reports directory as the embedded-run result first")
    parser.add_argument("--duration-s", type=float, default=0.0, help="with --embedded: how long the DAG took (make run prints it)")
    parser.add_argument("--commit", default=None, help="with --embedded: the commit the run was made at (default: this checkout's HEAD)")


def run_cli(args) -> int:
    if args.embedded:
        print(f"stored {store_embedded(args.embedded, args.duration_s, args.commit)}")
    for path in write_all():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0
