"""
### Layer-sensitive quantization pipeline

Quantizes one base model with every (backend, method, budget) variant requested, evaluates each, and
records everything in MLflow:

prepare -> profile -> allocate -> quantize (mapped) -> evaluate (mapped) -> record (mapped) -> finish.

Trigger it from the UI form, the REST API or `airflow dags test quantization_pipeline -c '<json>'` with
any of the Params below (generated from `PipelineConfig`); the defaults run the embedded SmolLM2-135M
on CPU. It also runs on every new checkpoint announced on the asset `quantpipe://checkpoints` (the
`checkpoint_watch` DAG), and once per pending zoo entry (the `model_zoo` DAG triggers it).

The tasks come from the step table (tasks/orchestration/step_table.py). Where they run is read when
this file is parsed: `QUANT_RUNTIME=inprocess` (default) runs every step as a TaskFlow task in the
worker; `docker` or `kubernetes` runs each in its own container (the backend's image for quantize and
evaluate, with a GPU for the GPU steps).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Asset, Param, dag

from tasks.orchestration import watch
from tasks.orchestration.config import param_specs
from tasks.orchestration.dag_factory import build_steps
from tasks.deploy.launch import LaunchConfig

DAG_ID = "quantization_pipeline"
LAUNCH = LaunchConfig.from_env()  # QUANT_RUNTIME, read at parse time: TaskFlow or containers
PARAMS = {name: Param(spec.pop("default"), **spec) for name, spec in param_specs().items()}


@dag(
    dag_id=DAG_ID,
    schedule=[Asset(watch.CHECKPOINTS_URI)],  # manual, REST, zoo and `dags test` triggers keep working
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=PARAMS,
    # Templates only render the container steps' JSON --input, which must stay a string.
    render_template_as_native_obj=False,
    max_active_runs=1,
    tags=["quantization"],
    doc_md=__doc__,
)
def quantization_pipeline():
    build_steps(LAUNCH)


quantization_pipeline()
