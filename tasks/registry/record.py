"""The registry's two per-variant stages. `record(ctx, RecordParams) -> Recorded`: the variant's MLflow
child run (bit map and its heat map, evaluation, metrics, logged model) and, for a quantized variant, its
registered model version made from the logged model. `verify(ctx, RecordParams, Recorded) -> LoadCheck`:
the reload check of that version (tasks/registry/load_check.py), unless it passed before; only versions
that pass may become champion.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from tasks.allocation.stage import VariantPlan
from tasks.artifacts import ensure_local, stable_hash, write_json_atomic
from tasks.calibration import Calibration
from tasks.contracts import Contract
from tasks.evaluation.stage import EvalParams, Evaluation
from tasks.failpoints import failpoint
from tasks.model_io import ResolvedModel
from tasks.quantize.stage import QuantizedModel
from tasks.quantize.registry import get_backend


@dataclass(frozen=True)
class RecordParams(Contract):
    model: ResolvedModel
    parent_run_id: str
    calibration: Calibration
    settings: EvalParams
    plan: VariantPlan
    quantized: QuantizedModel
    evaluation: Evaluation
    metrics: dict  # the evaluation's, with what allocation and quantization know (bpp, predicted loss, seconds)

    @property
    def config_hash(self) -> str:
        """Weights + calibration + evaluation settings: one MLflow run each."""
        return stable_hash({"model_hash": self.plan.model_hash, "calibration": Path(self.calibration.uri).name, "eval": info_settings(self.settings)})


@dataclass(frozen=True)
class Recorded(Contract):
    run_id: str
    reused: bool
    version: str | None = None  # the registered version (quantized variants)
    model_id: str | None = None  # the run's MLflow logged model


@dataclass(frozen=True)
class LoadCheck(Contract):
    status: str  # "passed" or "failed"
    detail: str


def record(ctx, params: RecordParams) -> Recorded:
    from tasks.registry.mlflow_model import serving as serving_of
    from tasks.registry.naming import BITMAP_JSON, BITMAP_PNG, EVALUATION_JSON, MANIFEST_JSON, registered_model_name
    from tasks.registry.tracking import log_variant
    from tasks.registry.versions import register_version, version_description, version_tags

    plan, model = params.plan, params.model
    info = {"name": plan.name, "backend": plan.backend, "method": plan.method, "budget_label": plan.budget_label, "base_model": model.name,
            "base_revision": model.revision, "config_hash": params.config_hash, "model_hash": plan.model_hash, "options": plan.options}  # fmt: skip
    serving = serving_of(plan.backend) if plan.quantized else "the unquantized base model"
    description = version_description(info, params.metrics, serving)
    with tempfile.TemporaryDirectory(prefix="quant-record-") as tmp:
        evaluation = {"variant": plan.name, "settings": info_settings(params.settings), "metrics": params.metrics}
        files = {EVALUATION_JSON: str(write_json_atomic(Path(tmp) / EVALUATION_JSON, evaluation)),
                 BITMAP_JSON: plan.bitmap and str(ensure_local(plan.bitmap))}  # fmt: skip
        if files[BITMAP_JSON]:
            files[BITMAP_PNG] = str(_bitmap_figure(files[BITMAP_JSON], plan.name, Path(tmp) / BITMAP_PNG))
        build = None
        if plan.quantized:
            files[MANIFEST_JSON] = str(ensure_local(params.quantized.uri) / "manifest.json")
            build = _model_builder(ctx, params, files[BITMAP_JSON], registered_model_name(model.name))
        run_id, reused, model_id = log_variant(
            ctx.settings.tracking_uri, params.parent_run_id, info, params.metrics, files, build,
            weights_dir=files.get(MANIFEST_JSON) and Path(files[MANIFEST_JSON]).parent,
            started_ms=params.quantized.started_ms, description=description,
        )  # fmt: skip
    failpoint("record.logged")  # the run logged, the version not yet registered
    if not plan.quantized:
        return Recorded(run_id, reused, None, model_id)
    tags = version_tags(plan.name, plan.method, plan.backend, params.metrics, plan.model_hash, serving)
    tags.update(get_backend(plan.backend).engine_checks(ensure_local(params.quantized.uri)))  # e.g. vllm: whether vLLM's loader takes it
    version, _ = register_version(ctx.settings.tracking_uri, model.name, run_id, tags, claims_root=str(ctx.settings.artifact_root),
                                  description=description, model_id=model_id)  # fmt: skip
    failpoint("record.registered")
    return Recorded(run_id, reused, version, model_id)


def info_settings(settings: EvalParams) -> dict:
    """The evaluation settings as the run's evaluation.json states them."""
    return {k: v for k, v in settings.to_json().items() if k != "datasets"}


def _model_builder(ctx, params: RecordParams, bitmap: str | None, registered: str):
    """build(out): the variant's MLflow model directory (weights, loader, model card), for log_variant."""
    from tasks.registry.mlflow_model import build_mlflow_model

    model = params.model
    variant = {**params.plan.to_json(), "bitmap": bitmap, "model_dir": str(ensure_local(params.quantized.uri)),
               "model": {**model.to_json(), "path": str(model.local(ctx.settings.cache_dir))}}  # fmt: skip
    return lambda out: build_mlflow_model(variant, params.metrics, registered, out)


def _bitmap_figure(bitmap_json: str, name: str, out: Path) -> Path:
    """The bit map's heat map (modules x layers, colour = rung), for the variant's run."""
    from tasks.bitmap import BitMap
    from tasks.reports.plots import plot_bitmap_heatmap

    return plot_bitmap_heatmap(BitMap.load(bitmap_json), out, name=name)


def verify(ctx, params: RecordParams, recorded: Recorded) -> LoadCheck | None:
    """The version's reload check (None for a variant without a version: the base model)."""
    if not recorded.version:
        return None
    from tasks.evaluation.stage import metric_name
    from tasks.registry.load_check import DETAIL_TAG, TAG, check_version
    from tasks.registry.naming import registered_model_name
    from tasks.registry.tracking import client_for

    name = registered_model_name(params.model.name)
    tags = client_for(ctx.settings.tracking_uri).get_model_version(name, recorded.version).tags
    if tags.get(TAG) == "passed":
        return LoadCheck("passed", tags.get(DETAIL_TAG, ""))
    m, protocol = params.evaluation.metrics, params.evaluation.protocol
    if "reload_ppl" in m:  # the first 2,048 tokens' perplexity, recorded by the evaluation
        expected, tokens = m["reload_ppl"], int(m["reload_tokens"])
    else:
        expected, tokens = m[metric_name("wikitext2", protocol)], params.settings.eval_tokens
    result = check_version(ctx.settings.tracking_uri, name, recorded.version, str(params.calibration.local()), tokens, expected, protocol)
    return LoadCheck("passed" if result["passed"] else "failed", result["detail"])
