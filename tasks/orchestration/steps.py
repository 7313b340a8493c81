"""The pipeline's steps: wiring only. Each builds one stage's typed params from the run's config and the
upstream manifests, calls the stage's `run(ctx, params)` and returns JSON (Airflow XCom, the containers'
`--input`). Which step feeds which, where it runs and whether it is mapped over the variants is the step
table's business (tasks/orchestration/step_table.py), not theirs.

    prepare (model + calibration + parent run) -> profile -> allocate (every variant's bit map)
    -> quantize (per variant) -> evaluate (per variant) -> record (MLflow run + version per variant)
    -> verify (per variant: the version reloads in a fresh process and reproduces its perplexity)
    -> finish (promote, reports, parent run closed, completion marker)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from tasks.allocation.stage import VariantPlan
from tasks.calibration import Calibration
from tasks.context import StageContext
from tasks.contracts import Contract
from tasks.evaluation.stage import EvalParams, Evaluation
from tasks.model_io import ResolvedModel
from tasks.orchestration.config import PipelineConfig, calibration_params
from tasks.profiling.stage import Profile
from tasks.quantize.stage import QuantizedModel
from tasks.registry.record import LoadCheck, Recorded, RecordParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared(Contract):
    """prepare's manifest: the validated config, the resolved model, the token sets, the parent run."""

    config: dict
    model: ResolvedModel
    calibration: Calibration
    parent_run_id: str

    @property
    def params(self) -> PipelineConfig:
        return PipelineConfig.from_dict(self.config)


@dataclass(frozen=True)
class VariantRecord(Contract):
    """One variant through the mapped steps: the run's inputs, its plan and each step's manifest."""

    run: Prepared
    plan: VariantPlan
    profile: Profile | None = None
    quantized: QuantizedModel | None = None
    evaluation: Evaluation | None = None
    recorded: Recorded | None = None
    load_check: LoadCheck | None = None

    def to_json(self) -> dict:  # + what the orchestrator reads of an item: its name (the UI) and backend image
        return {"name": self.plan.name, "backend_image": self.plan.backend if self.plan.quantized else None, **super().to_json()}

    @property
    def settings(self) -> EvalParams:
        return EvalParams.settings_of(self.run.params)

    @property
    def metrics(self) -> dict:
        """The evaluation's metrics with what allocation and quantization know of the variant."""
        known = {"nominal_bpp": self.plan.nominal_bpp, "extra_pct": self.plan.extra_pct, "predicted_dnll": self.plan.predicted_dnll,
                 "quant_seconds": self.quantized and self.quantized.quant_seconds}  # fmt: skip
        return {**self.evaluation.metrics, **{k: v for k, v in known.items() if v is not None}}

    @property
    def record_params(self) -> RecordParams:
        return RecordParams(self.run.model, self.run.parent_run_id, self.run.calibration, self.settings, self.plan, self.quantized,
                            self.evaluation, self.metrics)  # fmt: skip


def prepare(ctx: StageContext, config: dict) -> dict:
    """Resolve the model, tokenize calibration/evaluation sets and open the MLflow parent run."""
    from tasks import calibration
    from tasks.model_io import resolve_model
    from tasks.registry.tracking import start_pipeline_run

    cfg = PipelineConfig.from_dict(config)
    model = resolve_model(cfg.model, cfg.revision, ctx.settings.cache_dir)
    tokens = calibration.run(ctx, replace(calibration_params(cfg), model=model))
    parent = start_pipeline_run(ctx.settings.tracking_uri, model.name, model.revision, cfg.to_dict(), str(ctx.settings.mlflow_artifacts),
                                tags=ctx.run_tags)  # fmt: skip
    return Prepared(cfg.to_dict(), model, tokens, parent).to_json()


def profile(ctx: StageContext, prepared: dict) -> dict | None:
    """The scores table (cached by model and calibration), linked from the parent run; None when no method reads it."""
    from tasks.profiling import stage
    from tasks.registry.tracking import client_for, log_profile_run

    prep = Prepared.from_json(prepared)
    cfg = prep.params
    if not cfg.scored_methods and not cfg.profiled_errors:
        return None
    params = stage.ProfileParams(prep.model, prep.calibration, cfg.gradient_windows, cfg.rival_scores, cfg.dkld, cfg.profiled_errors)
    result = stage.run(ctx, params)
    run = log_profile_run(ctx.settings.tracking_uri, prep.model.name, prep.model.revision, result.local(), result.key,
                          str(ctx.settings.mlflow_artifacts))  # fmt: skip
    client_for(ctx.settings.tracking_uri).set_tag(prep.parent_run_id, "profile_run_id", run)
    return result.to_json()


def allocate(ctx: StageContext, prepared: dict, profiled: dict | None) -> list[dict]:
    """Every variant's plan, the baseline first: the items of the mapped steps."""
    from tasks.allocation import stage

    prep = Prepared.from_json(prepared)
    scores = profiled and Profile.from_json(profiled)
    allocation = stage.run(ctx, stage.AllocationParams.settings_of(prep.params, model=prep.model, profile=scores, calibration=prep.calibration))
    return [VariantRecord(prep, plan, scores).to_json() for plan in allocation.variants]


def quantize(ctx: StageContext, item: dict) -> dict:
    from tasks.quantize import stage
    from tasks.quantize.registry import capabilities

    v = VariantRecord.from_json(item)
    options = v.run.params.backend_options.get(v.plan.backend, {})
    imatrix = v.profile.imatrix if v.profile and v.plan.quantized and capabilities(v.plan.backend).imatrix else None
    quantized = stage.run(ctx, stage.QuantizeParams(v.run.model, v.plan.backend, v.plan.bitmap, v.run.calibration, options, imatrix))
    return replace(v, quantized=quantized).to_json()


def evaluate(ctx: StageContext, item: dict) -> dict:
    from tasks.evaluation import stage

    v = VariantRecord.from_json(item)
    evaluation = stage.run(ctx, stage.EvaluationParams(v.run.model, v.plan.backend, v.quantized, v.run.calibration, v.settings))
    return replace(v, evaluation=evaluation).to_json()


def record(ctx: StageContext, item: dict) -> dict:
    from tasks.registry.record import record as record_variant

    v = VariantRecord.from_json(item)
    return replace(v, recorded=record_variant(ctx, v.record_params)).to_json()


def verify(ctx: StageContext, item: dict) -> dict:
    from tasks.registry.record import verify as verify_version

    v = VariantRecord.from_json(item)
    return replace(v, load_check=verify_version(ctx, v.record_params, v.recorded)).to_json()


def finish(ctx: StageContext, prepared: dict, verified: list[dict]) -> dict:
    """Promote the champion, write the reports, log them on the parent run, close it, share its runs
    view, and mark this configuration done for this checkpoint (the zoo's completion marker)."""
    from tasks.artifacts import write_json_atomic
    from tasks.failpoints import failpoint
    from tasks.registry.completion import record_completion
    from tasks.registry.naming import registered_model_name
    from tasks.registry.promotion import promote_by
    from tasks.registry.tracking import finish_pipeline_run
    from tasks.registry.ui import pipeline_description, run_links
    from tasks.reports.run_report import point_latest, results_row, write_run_report

    prep = Prepared.from_json(prepared)
    records = [VariantRecord.from_json(v) for v in verified]
    reports, registered = ctx.settings.home / "reports", registered_model_name(prep.model.name)
    out = reports / prep.parent_run_id
    decision = promote_by(ctx.settings.tracking_uri, registered, prep.params) if any(v.plan.quantized for v in records) else None
    rows = [results_row(v.plan, v.metrics, v.recorded.run_id, v.recorded.version, v.load_check and v.load_check.status) for v in records]
    scores = next((v.profile.scores for v in records if v.profile), None)
    report = write_run_report(out, rows, [v.evaluation.uri for v in records], [v.plan.predicted_dnll for v in records],
                              [v.plan.bitmap for v in records if v.plan.bitmap], scores, decision)  # fmt: skip
    failpoint("finish.reported")
    links = run_links(ctx.settings.tracking_uri, prep.parent_run_id, [v.recorded.run_id for v in records], registered,
                      decision and decision.get("champion"))  # fmt: skip
    write_json_atomic(out / "links.json", links)
    description = pipeline_description(len(records), links, report["champion"], report["table"], report["summary"])
    finish_pipeline_run(ctx.settings.tracking_uri, prep.parent_run_id, out, metrics=report["metrics"], description=description)
    point_latest(reports, out)
    record_completion(ctx.settings.artifact_root, prep.config, prep.model.to_json(), prep.parent_run_id, out, rows)
    log.info("results:\n%s\n%s", report["table"], report["champion"])
    return {"reports": str(out), "promotion": decision, "table": report["table"], "champion": report["champion"],
            "parent_run_id": prep.parent_run_id, "links": links}  # fmt: skip
