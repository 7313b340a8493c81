"""
### Model zoo

Quantizes every model of the zoo file (`dags/zoo.yaml`, or `$QUANT_ZOO_FILE`) once per checkpoint
revision: `plan` resolves each entry's revision and looks up its key (entry config + revision); `run`,
mapped over the entries, skips those whose key already has a completion marker, runs the whole pipeline
in-process for the others and writes their markers. An entry whose revision could not be looked up fails
its own `run` instance; the others go on.

A second run with nothing new quantizes nothing. The schedule is `$QUANT_ZOO_SCHEDULE` (a cron
expression or preset, default `@daily`; `none` for manual and REST triggers only). Logic: `tasks.zoo`;
this file only wires.
"""

from __future__ import annotations

import os

import pendulum
from airflow.sdk import dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from tasks import zoo

SCHEDULE = os.environ.get("QUANT_ZOO_SCHEDULE", "@daily").strip() or "@daily"


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

    @task(max_active_tis_per_dagrun=1, map_index_template="{{ zoo_entry }}")
    def run(item: dict) -> dict:
        get_current_context()["zoo_entry"] = item["name"]  # names the mapped instance in the UI
        result = zoo.run_entry(item)
        if not result["ran"]:
            raise AirflowSkipException(f"{item['name']}: {result['reason']}")
        return result

    run.expand(item=plan())


model_zoo()
