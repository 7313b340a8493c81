"""The reports' commands: `python -m tasks report` (comparison table and plots of a run, tasks/reports/__init__.py)
and `python -m tasks docs` (the generated tables of README.md and docs/, docs_tables.py)."""

from __future__ import annotations

from pathlib import Path


def configure_report(parser) -> None:
    parser.add_argument("--results", required=True, help="results CSV, one row per variant")
    parser.add_argument("--bitmaps", default=None, help="directory of bit-map JSON files (searched recursively)")
    parser.add_argument("--scores", default=None, help="scores CSV from the profiling stage (optional)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--title", default="Quantization comparison", help="report title")
    parser.add_argument("--champion", default=None, help="the champion's variant name, marked in the table and plot")


def run_report(args) -> int:
    from tasks.reports import load_bitmaps, read_table, write_reports

    results = read_table(args.results, "results")
    bitmaps = load_bitmaps(args.bitmaps) if args.bitmaps else {}
    for path in write_reports(results, bitmaps, args.scores, args.out, title=args.title,
                              champion=args.champion):
        print(path)
    return 0


def configure_docs(parser) -> None:
    parser.add_argument("--embedded", type=Path, help="store this run's reports directory as the embedded-run result first")
    parser.add_argument("--duration-s", type=float, default=0.0, help="with --embedded: how long the DAG took (make run prints it)")
    parser.add_argument("--commit", default=None, help="with --embedded: the commit the run was made at (default: this checkout's HEAD)")
    parser.add_argument("--pipeline-backends", type=Path, metavar="DIR",
                        help="store this pipeline run's reports directory (its results.json) as the backends table's result first")  # fmt: skip


def run_docs(args) -> int:
    from tasks.reports.docs_tables import store_embedded, store_pipeline_backends, write_all
    from tasks.settings import REPO_ROOT

    if args.embedded:
        print(f"stored {store_embedded(args.embedded, args.duration_s, args.commit)}")
    if args.pipeline_backends:
        print(f"stored {store_pipeline_backends(args.pipeline_backends)}")
    for path in write_all():
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0
