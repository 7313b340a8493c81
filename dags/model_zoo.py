"""
### Model zoo

Quantizes every model of the zoo file (`dags/zoo.yaml`, or `$QUANT_ZOO_FILE`) once per checkpoint
revision: `plan` resolves each entry's revision and looks up its key (entry config + revision);
`trigger`, mapped over the pending entries, starts one `quantization_pipeline` DAG run each, with the
entry's config as conf, and waits for it (deferred: no worker slot is held). So each entry gets the
pipeline's mapping, per-variant retries and, under the kubernetes runtime, its GPU pods. An entry whose
key has a completion marker (written by the pipeline run that finished it) is skipped; `check` fails
the run if a revision lookup failed, after the other entries were triggered.

A second run with nothing new triggers nothing. The schedule is `$QUANT_ZOO_SCHEDULE` (a cron
expression or preset, default `@daily`; `none` for manual and REST triggers only); the triggered runs
are polled every `$QUANT_ZOO_POLL_SECONDS` (default 60). `airflow dags test model_zoo` has no scheduler
to run the triggered runs: set `QUANT_ZOO_WAIT=false` there (the runs stay queued for a scheduler), or use
`python -m tasks zoo run` to run the pending entries in one process. Logic: `tasks.orchestration.zoo`.
"""

from __future__ import annotations

import os

import pendulum
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import dag, task

from tasks.errors import PipelineError
from tasks.orchestration import zoo

SCHEDULE = os.environ.get("QUANT_ZOO_SCHEDULE", "@daily").strip() or "@daily"
POLL_SECONDS = int(os.environ.get("QUANT_ZOO_POLL_SECONDS") or 60)
WAIT = (os.environ.get("QUANT_ZOO_WAIT") or "true").strip().lower() not in ("0", "false", "no")


@dag(
    dag_id="model_zoo",
    schedule=None if SCHEDULE.lower() == "none" else SCHEDULE,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["quantization", "zoo"],
    doc_md=__doc__,
)
def model_zoo():
    @task
    def plan() -> list[dict]:
        return zoo.plan_zoo(zoo.load_zoo())

    @task
    def pending(items: list[dict], **context) -> list[dict]:
        return zoo.trigger_requests(items, context["run_id"])

    @task(trigger_rule="all_done")
    def check(items: list[dict]) -> None:
        if errors := zoo.failed_lookups(items):
            raise PipelineError("zoo: " + "; ".join(errors))

    items = plan()
    triggered = TriggerDagRunOperator.partial(
        task_id="trigger",
        trigger_dag_id="quantization_pipeline",
        wait_for_completion=WAIT,
        deferrable=True,
        poke_interval=POLL_SECONDS,
        skip_when_already_exists=True,
    ).expand_kwargs(pending(items))
    triggered >> check(items)


model_zoo()
