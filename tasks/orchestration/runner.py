"""Runs steps of the step table: one (`run_step`, what every DAG task and container does) or the whole
graph in this process (`run_inprocess`, `python -m tasks pipeline` in cli.py, the same order as the DAG)."""

from __future__ import annotations

import logging

from tasks.context import StageContext
from tasks.orchestration.step_table import CONF, STEPS, Step

log = logging.getLogger(__name__)


def run_step(step: Step, *inputs, ctx: StageContext | None = None):
    """Call the step's function with its context (from the environment unless given) and inputs."""
    ctx = ctx or StageContext.from_env(gpu=step.gpu)
    return step.resolve()(ctx, *inputs)


def run_inprocess(config: dict, ctx: StageContext | None = None) -> dict:
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
                end_pipeline_run((ctx or StageContext.from_env()).settings.tracking_uri, prepared["parent_run_id"], status)
            except Exception as end_exc:  # noqa: BLE001 (the step's own error is the one to report)
                log.warning("could not end the MLflow parent run: %s", end_exc)
        raise
    return results[STEPS[-1].name]


def _walk(results: dict, ctx: StageContext | None) -> None:
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
