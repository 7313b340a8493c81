"""Airflow tasks generated from the step table, inside a `@dag` function.

With QUANT_RUNTIME=inprocess (the default) every step is a TaskFlow task that calls the step in the
Airflow worker; with docker or kubernetes every step is `python -m tasks step NAME --input JSON` in its
image (the backend's image for the backend steps, a GPU for the GPU steps), fed by a small
`<step>_input` task that builds its JSON. Mapped steps map over the variants either way, one instance
per variant, named by the variant. Nothing here knows which steps exist: it walks STEPS.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta

from airflow.sdk import get_current_context, task

from tasks.deploy.launch import STEP_STAGE, LaunchConfig, make_operator, operator_spec, task_kwargs
from tasks.orchestration.step_table import CONF, STEPS, Step

RETRY_DELAY = timedelta(seconds=30)


def run_conf(context) -> dict:
    """The run's pipeline config: its params, or the checkpoint event's model over the zoo entry."""
    from tasks.orchestration import watch, zoo

    params = dict(context["params"])
    extras = watch.event_extras(context.get("triggering_asset_events"))
    if not extras:
        return params
    return watch.event_config(params, extras, zoo.load_zoo(validate=False))  # prepare validates


def _policy(step: Step) -> dict:
    """Operator arguments from the step's row: retries with backoff, one instance at a time."""
    kwargs: dict = {"retries": step.retries, "on_failure_callback": end_failed_run}
    if step.retries:
        kwargs.update(retry_delay=RETRY_DELAY, retry_exponential_backoff=2.0)
    if step.serial:
        kwargs["max_active_tis_per_dagrun"] = 1
    if step.mapped:
        kwargs["map_index_template"] = "{{ variant }}"
    return kwargs


def end_failed_run(context) -> None:
    """A step failed for good (its retries spent): end the run's MLflow parent run, and the child runs it
    left open, as FAILED, so the UI does not show a dead run as running."""
    from tasks.context import StageContext
    from tasks.registry.tracking import end_pipeline_run

    try:
        prepared = _data(context["ti"].xcom_pull(task_ids=STEPS[0].name))
        if prepared and prepared.get("parent_run_id"):
            end_pipeline_run(StageContext.from_env().settings.tracking_uri, prepared["parent_run_id"], "FAILED")
    except Exception as exc:  # noqa: BLE001 (a callback must not hide the task's own failure)
        import logging

        logging.getLogger(__name__).warning("could not end the MLflow parent run: %s", exc)


def _native(value):
    """An in-process upstream result as the step takes it: a lazy sequence of mapped results becomes a
    list; anything else (a dict, a path string, None) is already the step's value."""
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes, list, tuple)):
        return list(value)
    return value


def _data(value):
    """A container step's upstream result as plain data: a JSON string (Docker XCom), a dict, or a lazy
    sequence of mapped results (a list)."""
    if isinstance(value, str):
        return json.loads(value)
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, Sequence):
        return [_data(v) for v in value]
    return value


def build_steps(launch: LaunchConfig) -> dict:
    """Create the tasks of every step in the current DAG; returns step name -> its output."""
    if launch.runtime == "inprocess":
        return _taskflow()
    return _containers(launch)


# ---- in-process: TaskFlow ---------------------------------------------------------------------------


def _callable(step: Step):
    from tasks.orchestration.runner import run_step

    if step.inputs == (CONF,):
        def call():
            return run_step(step, run_conf(get_current_context()))
    elif step.mapped:
        def call(item):
            get_current_context()["variant"] = item.get("name", "")  # names the mapped instance in the UI
            return run_step(step, item)
    else:
        def call(*inputs):
            return run_step(step, *(_native(i) for i in inputs))
    call.__name__ = call.__qualname__ = step.name
    call.__doc__ = f"Step {step.name} of the step table ({step.function})."
    return call


def _taskflow() -> dict:
    outputs: dict = {}
    for step in STEPS:
        op = task(_callable(step), task_id=step.name, **_policy(step))
        if step.mapped:
            outputs[step.name] = op.expand(item=outputs[step.inputs[0]])
        else:
            outputs[step.name] = op(*(outputs[i] for i in step.inputs if i != CONF))
    return outputs


# ---- containers: one pod or container per step -------------------------------------------------------


@task
def _conf_input(**context) -> str:
    return json.dumps(run_conf(context))


@task
def _step_input(*parts) -> str:
    """The JSON --input of an unmapped step; steps of several inputs take a list."""
    values = [_data(p) for p in parts]
    return json.dumps(values[0] if len(values) == 1 else values)


def _launches(step_name: str, launch: LaunchConfig):
    """The task that lists one launch per variant: its JSON as --input, in its backend's image (the
    baseline's: core). A closure, so that the launch settings never enter the serialized DAG."""

    def launches(upstream) -> list[dict]:
        out = []
        for variant in _data(upstream):
            backend = variant.get("backend_image")  # the item's own word (a variant record: its backend; the baseline: none)
            out.append(task_kwargs(STEP_STAGE, backend, [step_name, "--input", json.dumps(variant)], launch))
        return out

    return task(launches, task_id=f"{step_name}_input")


def _containers(launch: LaunchConfig) -> dict:
    outputs: dict = {}
    for step in STEPS:
        policy = {k: v for k, v in _policy(step).items() if k != "map_index_template"}
        if step.mapped:
            launches = _launches(step.name, launch)(outputs[step.inputs[0]])
            cls, shared, _ = operator_spec(STEP_STAGE, None, [step.name], launch)
            op = cls.partial(task_id=step.name, **shared, **policy).expand_kwargs(launches)
        else:
            if step.inputs == (CONF,):
                payload = _conf_input.override(task_id=f"{step.name}_input")()
            else:
                payload = _step_input.override(task_id=f"{step.name}_input")(*(outputs[i] for i in step.inputs))
            # The operator renders its arguments as a template, so the payload's dependency is set here.
            op = make_operator(step.name, STEP_STAGE, None, [step.name, "--input", payload], launch, **policy)
            payload >> op
        outputs[step.name] = op.output
    return outputs
