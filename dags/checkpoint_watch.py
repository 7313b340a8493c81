"""
### Checkpoint watch

Hourly: looks up the current revision of every `watch: true` entry of the zoo file (hub ids: the commit
from the hub API; local and embedded checkpoints: their content hash) and compares it with the last
seen one. Each change becomes one event on the asset `quantpipe://checkpoints` with extra
`{"model", "revision", "previous", "entry"}`, which schedules `quantization_pipeline` for that model;
first sights and unchanged checkpoints are skipped, failed lookups fail their own instance. `commit`
then records first sights and announced changes as seen (anything else is tried again next hour) and
fails the run if a lookup or an announcement failed. Logic: `tasks.orchestration.watch`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from tasks.orchestration import watch, zoo
from tasks.errors import PipelineError

CHECKPOINTS = Asset(watch.CHECKPOINTS_URI)


@dag(
    dag_id="checkpoint_watch",
    schedule="@hourly",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["quantization", "zoo"],
    doc_md=__doc__,
)
def checkpoint_watch():
    @task
    def detect() -> list[dict]:
        return watch.detect(zoo.load_zoo(validate=False), watch.load_state())

    @task(outlets=[CHECKPOINTS], map_index_template="{{ watched }}")
    def announce(observation: dict, **context) -> dict:
        get_current_context()["watched"] = observation["entry"]  # names the mapped instance in the UI
        if observation["status"] == "error":
            raise PipelineError(f"watch: {observation['entry']}: {observation['error']}")
        if observation["status"] != "changed":  # a skipped instance emits no asset event
            raise AirflowSkipException(f"{observation['model']}: {observation['status']} at {observation['revision']}")
        context["outlet_events"][CHECKPOINTS].extra = watch.event_extra(observation)
        return watch.event_extra(observation)

    # Also after failures: records what was seen and announced, then fails the run on any problem.
    @task(trigger_rule="all_done")
    def commit(observations: list[dict], announced) -> int:
        sent = list(announced[:]) if announced else []  # one slice query: the successful announcements
        state, problems = watch.apply(watch.load_state(), observations, sent)
        watch.save_state(state)
        if problems:
            raise PipelineError("watch: " + "; ".join(problems))
        return sum(o["status"] == "changed" for o in observations)

    observations = detect()
    commit(observations, announce.expand(observation=observations))

checkpoint_watch()
