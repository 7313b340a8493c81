"""The stages' typed contracts travel as JSON between steps (XCom, `--input`): every params and manifest
class round-trips, nested contracts and tuples included, and a params object built from the run's config
takes the same-named Params."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tasks.allocation.stage import AllocationParams, VariantPlan
from tasks.calibration import Calibration, CalibrationParams
from tasks.evaluation.stage import EvalParams, Evaluation, EvaluationParams
from tasks.model_io import ResolvedModel
from tasks.orchestration.config import PipelineConfig
from tasks.orchestration.steps import Prepared, VariantRecord
from tasks.profiling.stage import Profile, ProfileParams
from tasks.quantize.stage import QuantizedModel, QuantizeParams
from tasks.registry.record import LoadCheck, Recorded, RecordParams

MODEL = ResolvedModel("m", Path("/models/m"), "rev1", "org/m")
CALIBRATION = Calibration("/state/artifacts/calibration/abc")
PLAN = VariantPlan("hqq/SB30/3.25", "hqq", "sensiboost", "SB30", "3.25", "hash", 3.25, {"boost_stop": 3}, "/b/SB30-3.25.json", 3.3, 1.5, 0.01)
QUANTIZED = QuantizedModel("/state/artifacts/quantized/hqq/k", "k", 1_700_000_000_000, 12.5)
EVALUATION = Evaluation("/state/artifacts/evaluation/e", {"ppl_wikitext2": 21.5, "reload_ppl": 20.0, "reload_tokens": 2048}, "paper")
SETTINGS = EvalParams(eval_tokens=4096, protocols=("paper", "gptq"))


def _round_trip(value):
    again = type(value).from_json(json.loads(json.dumps(value.to_json())))
    assert again == value, type(value).__name__
    return again


def test_every_params_and_manifest_round_trips_through_json():
    prepared = Prepared(PipelineConfig().to_dict(), MODEL, CALIBRATION, "parent")
    record = VariantRecord(prepared, PLAN, Profile("/p", "key"), QUANTIZED, EVALUATION, Recorded("run", False, "3", "m-1"), LoadCheck("passed", "ok"))
    for value in (MODEL, CALIBRATION, CalibrationParams(samples=4, model=MODEL), ProfileParams(MODEL, CALIBRATION, 8, True, False, ("gptq",)),
                  AllocationParams(MODEL, Profile("/p", "key"), ("hqq", "gptq"), ("b4g64",), ("optimal",), ("3.3",), {"optimal": {"objective": "fisher"}}),
                  PLAN, QuantizeParams(MODEL, "hqq", PLAN.bitmap, CALIBRATION, {"x": 1}), QUANTIZED, SETTINGS,
                  EvaluationParams(MODEL, "hqq", QUANTIZED, CALIBRATION, SETTINGS), EVALUATION, prepared, record,
                  RecordParams(MODEL, "parent", CALIBRATION, SETTINGS, PLAN, QUANTIZED, EVALUATION, {"a": 1.0})):  # fmt: skip
        _round_trip(value)
    assert isinstance(_round_trip(record).plan.options, dict) and _round_trip(SETTINGS).protocols == ("paper", "gptq")


def test_a_record_tells_the_orchestrator_its_name_and_image_and_reads_back_without_them():
    prepared = Prepared({}, MODEL, CALIBRATION, "parent")
    quantized = VariantRecord(prepared, PLAN).to_json()
    base = VariantRecord(prepared, dataclasses.replace(PLAN, backend="none", name="none/unquantized/fp32")).to_json()
    assert (quantized["name"], quantized["backend_image"]) == ("hqq/SB30/3.25", "hqq")
    assert (base["name"], base["backend_image"]) == ("none/unquantized/fp32", None)
    assert VariantRecord.from_json(quantized) == VariantRecord(prepared, PLAN)


def test_params_built_from_the_config_take_its_same_named_params():
    cfg = PipelineConfig.from_dict({"backends": ["hqq", "gptq"], "methods": ["optimal"], "budgets": ["3.3"], "eval_tokens": 2048, "protocols": ["gptq"]})
    allocation = AllocationParams.settings_of(cfg, model=MODEL, profile=None)
    assert (allocation.backends, allocation.budgets, allocation.methods) == (("hqq", "gptq"), ("3.3",), tuple(cfg.methods))
    settings = EvalParams.settings_of(cfg)
    assert (settings.eval_tokens, settings.protocols, settings.reload_protocol) == (2048, ("gptq",), "gptq")


def test_the_variant_metrics_add_what_allocation_and_quantization_know():
    record = VariantRecord(Prepared({}, MODEL, CALIBRATION, "parent"), PLAN, None, QUANTIZED, EVALUATION)
    assert record.metrics == {**EVALUATION.metrics, "nominal_bpp": 3.3, "extra_pct": 1.5, "predicted_dnll": 0.01, "quant_seconds": 12.5}
