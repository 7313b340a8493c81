"""`python -m tasks step NAME --input JSON [--output FILE]`: one step of the step table in a container.

This is how the DAG runs a step in production: the pod gets the upstream results (small JSON
references) as --input, a JSON list when the step takes several, and writes its result where
KubernetesPodOperator and DockerOperator collect XCom (/airflow/xcom/return.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import PipelineError
from tasks.orchestration.step_table import BY_NAME, get_step


def configure_parser(parser) -> None:
    parser.add_argument("name", choices=list(BY_NAME))
    parser.add_argument("--input", required=True, help="JSON (inline or a file): the step's input, a list for several")
    parser.add_argument("--output", default="/airflow/xcom/return.json", help="where to write the result JSON")


def run_cli(args) -> int:
    from tasks.orchestration.runner import inline_or_file, run_step

    step = get_step(args.name)
    text = inline_or_file(args.input, "--input")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--input is not valid JSON: {exc}") from None
    if len(step.inputs) > 1 and not (isinstance(payload, list) and len(payload) == len(step.inputs)):
        raise PipelineError(f"step {step.name} takes {len(step.inputs)} inputs ({', '.join(step.inputs)}) as a JSON list")
    result = run_step(step, *(payload if len(step.inputs) > 1 else [payload]))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, default=str))
    return 0
