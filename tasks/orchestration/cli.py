"""The orchestration's commands:

    python -m tasks pipeline [--config JSON] [--check]   the whole pipeline in this process, without Airflow (runner.py)
    python -m tasks zoo check|plan|run                    the model zoo (zoo.py)
    python -m tasks step NAME --input JSON [--output FILE]   one step of the step table in a container

The zoo's commands live apart from zoo.py because `run` runs the pipelines in this process (runner.py),
which the zoo's planning, imported by the steps and the Airflow image, must not depend on.

`step` is how the DAG runs a step in production: the pod gets the upstream results (small JSON
references) as --input, a JSON list when the step takes several, and writes its result where
KubernetesPodOperator and DockerOperator collect XCom (/airflow/xcom/return.json).
"""

from __future__ import annotations

import json
from pathlib import Path

from tasks.errors import PipelineError
from tasks.orchestration.step_table import BY_NAME, get_step
from tasks.orchestration.zoo import DEFAULT_ZOO, ZOO_ENV, failed_lookups, load_zoo, plan_zoo, run_pending

# ---- python -m tasks pipeline ... -------------------------------------------------------------------


def configure_pipeline(parser) -> None:
    parser.add_argument("--config", default=None, help="JSON file or inline JSON with PipelineConfig fields")
    parser.add_argument("--model", default=None)
    parser.add_argument("--eval-tokens", type=int, default=None)
    parser.add_argument("--check", action="store_true", help="validate the config and resolve the model, list the planned variants, then stop")


def inline_or_file(text: str, option: str) -> str:
    """The JSON text of an option given inline or as a file path (inline JSON may be longer than any
    path the filesystem accepts, so it is recognized by its first character, never stat'ed)."""
    if text.lstrip().startswith(("{", "[")):
        return text
    if not Path(text).is_file():
        raise PipelineError(f"{option} is neither inline JSON nor an existing file: {text[:200]}")
    return Path(text).read_text()


def read_config_arg(text: str | None) -> dict:
    if not text:
        return {}
    raw = inline_or_file(text, "--config")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise PipelineError("--config must be a JSON object of PipelineConfig fields")
    return config


def run_pipeline(args) -> int:
    config = read_config_arg(args.config)
    if args.model:
        config["model"] = args.model
    if args.eval_tokens is not None:
        config["eval_tokens"] = args.eval_tokens
    if args.check:
        from tasks.orchestration.preflight import model_family, plan_lines, preflight
        from tasks.settings import Settings

        cfg, model, notes = preflight(config, Settings.from_env().cache_dir)
        for note in notes:
            print(f"note: {note}")
        print(f"ok: {model.name} ({model.revision}) at {model.path}")
        for line in plan_lines(cfg, *model_family(model)):  # what the run would name, in its order
            print(line)
        return 0
    import signal

    from tasks.orchestration.runner import run_inprocess

    def terminated(signum, frame):  # a node drain or `kill`: end the run as KILLED, like Ctrl-C
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminated)
    result = run_inprocess(config)
    print(result["table"])
    print(result.get("champion", ""))
    from tasks.registry.ui import LINK_LABELS

    links = result.get("links") or {}
    for key, label in LINK_LABELS.items():  # the MLflow UI pages of this run
        if key in links:
            print(f"{label}: {links[key]}")
    print(f"\nreports: {result['reports']}")
    return 0


# ---- python -m tasks zoo check|plan|run -------------------------------------------------------------


def configure_zoo(parser) -> None:
    parser.add_argument("action", choices=("check", "plan", "run"), help="validate the zoo, show the plan, or run what is pending")
    parser.add_argument("--file", default=None, help=f"zoo file (default: ${ZOO_ENV} or {DEFAULT_ZOO})")


def run_zoo(args) -> int:
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


# ---- python -m tasks step NAME --input JSON [--output FILE] -----------------------------------------


def configure_step(parser) -> None:
    parser.add_argument("name", choices=list(BY_NAME))
    parser.add_argument("--input", required=True, help="JSON (inline or a file): the step's input, a list for several")
    parser.add_argument("--output", default="/airflow/xcom/return.json", help="where to write the result JSON")


def run_step(args) -> int:
    from tasks.orchestration import runner

    step = get_step(args.name)
    text = inline_or_file(args.input, "--input")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PipelineError(f"--input is not valid JSON: {exc}") from None
    if len(step.inputs) > 1 and not (isinstance(payload, list) and len(payload) == len(step.inputs)):
        raise PipelineError(f"step {step.name} takes {len(step.inputs)} inputs ({', '.join(step.inputs)}) as a JSON list")
    result = runner.run_step(step, *(payload if len(step.inputs) > 1 else [payload]))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, default=str))
    return 0
