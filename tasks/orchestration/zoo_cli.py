"""`python -m tasks zoo check|plan|run`: the zoo (tasks/orchestration/zoo.py) from the command line. Apart
from zoo.py because `run` runs the pipelines in this process (runner.py), which the zoo's planning, imported
by the steps and the Airflow image, must not depend on."""

from __future__ import annotations

import json

from tasks.errors import PipelineError
from tasks.orchestration.zoo import DEFAULT_ZOO, ZOO_ENV, failed_lookups, load_zoo, plan_zoo, run_pending


def configure_parser(parser) -> None:
    parser.add_argument("action", choices=("check", "plan", "run"), help="validate the zoo, show the plan, or run what is pending")
    parser.add_argument("--file", default=None, help=f"zoo file (default: ${ZOO_ENV} or {DEFAULT_ZOO})")


def run_cli(args) -> int:
    entries = load_zoo(args.file)
    if args.action == "check":
        for entry in entries:
            print(f"ok: {entry.name}: {entry.model}{' (watched)' if entry.watch else ''}")
        return 0
    items = plan_zoo(entries)
    if args.action == "plan":
        for item in items:
            print(f"{item['status']:9} {item['name']}: {item['reason']}")
        return 0
    from tasks.orchestration.runner import run_inprocess

    print(json.dumps(run_pending(items, run_inprocess), indent=2))
    errors = failed_lookups(items)
    if errors:
        raise PipelineError("zoo: " + "; ".join(errors))
    return 0
