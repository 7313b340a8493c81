"""Runs steps of the step table: one (`run_step`, what every DAG task and container does) or the whole
graph in this process (`run_inprocess`, `python -m tasks pipeline`, the same order as the DAG)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tasks.errors import PipelineError
from tasks.orchestration.context import StepContext
from tasks.orchestration.step_table import CONF, STEPS, Step

log = logging.getLogger(__name__)


def run_step(step: Step, *inputs, ctx: StepContext | None = None):
    """Call the step's function with its context (from the environment unless given) and inputs."""
    ctx = ctx or StepContext.from_env(gpu=step.gpu)
    return step.resolve()(ctx, *inputs)


def run_inprocess(config: dict, ctx: StepContext | None = None) -> dict:
    """The whole pipeline in this process, without Airflow; returns the last step's result. A step that
    fails ends the MLflow parent run as FAILED (KILLED on an interrupt or SIGTERM), then re-raises."""
    results: dict = {CONF: config}
    try:
        _walk(results, ctx)
    except BaseException as exc:
        prepared = results.get(STEPS[0].name)
        if prepared and STEPS[-1].name not in results:
            from tasks.registry.tracking import end_pipeline_run

            status = "KILLED" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "FAILED"
            try:
                end_pipeline_run((ctx or StepContext.from_env()).settings.tracking_uri, prepared["parent_run_id"], status)
            except Exception as end_exc:  # noqa: BLE001 (the step's own error is the one to report)
                log.warning("could not end the MLflow parent run: %s", end_exc)
        raise
    return results[STEPS[-1].name]


def _walk(results: dict, ctx: StepContext | None) -> None:
    for step in STEPS:
        args = [results[name] for name in step.inputs]
        if step.mapped:
            items = list(args[0])
            results[step.name] = []
            for i, item in enumerate(items):
                log.info("%s %d/%d: %s", step.name, i + 1, len(items), item.get("name", ""))
                results[step.name].append(run_step(step, item, ctx=ctx))
        else:
            log.info("%s", step.name)
            results[step.name] = run_step(step, *args, ctx=ctx)


# ---- CLI (python -m tasks pipeline ...) -------------------------------------------------------------


def configure_parser(parser) -> None:
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


def run_cli(args) -> int:
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
