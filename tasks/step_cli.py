"""`python -m tasks step NAME --input JSON [--output FILE]`: one pipeline step in a container.

This is how the DAG runs a step in production: the pod gets the upstream task's XCom (a small JSON
dict of references) as --input and writes its result where KubernetesPodOperator and DockerOperator
collect XCom (/airflow/xcom/return.json). The step functions are the same as in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import PipelineError

STEPS = ("prepare", "profile", "allocate", "quantize", "evaluate", "record", "finish")


def configure_parser(parser) -> None:
    parser.add_argument("name", choices=STEPS)
    parser.add_argument("--input", required=True, help="JSON (inline or a file): the step's argument(s)")
    parser.add_argument("--output", default="/airflow/xcom/return.json", help="where to write the result JSON")


def run_cli(args) -> int:
    from tasks import pipeline

    text = Path(args.input).read_text() if Path(args.input).is_file() else args.input
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--input is not valid JSON: {exc}") from None
    fn = getattr(pipeline, args.name)
    # Steps with two arguments (allocate, finish) take them as a JSON list.
    result = fn(*payload) if args.name in ("allocate", "finish") else fn(payload)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, default=str))
    return 0
