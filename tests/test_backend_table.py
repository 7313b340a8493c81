"""A backend is its module and its row of the backend table (tasks/quantize/registry.py): planning, the
pre-flight's notes and the MLflow model's serving facts ask its Capabilities, never its name. A dummy
backend registered in the table, and nothing else, is planned, announced and served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.errors import PipelineError
from tasks.orchestration.config import PipelineConfig, param_specs
from tasks.allocation.plan import plan_variants
from tasks.orchestration.preflight import backend_notes, planned_variants
from tasks.quantize import registry
from tasks.quantize.base import Backend, Capabilities, OwnErrors


class DummyBackend(Backend):
    """Fused serving kernels, 4-bit group-64 rungs only, no phi3, its checkpoint misread by transformers."""

    name = "dummy"
    capabilities = Capabilities(uniform_bits=(4,), group_sizes=(64,), bitmap="any", cpu=True, gpu=False, needs_calibration=False,
                                refused_families=(("phi3", "dummy kernels need separate q/k/v"),), fused_kernels=True,
                                serving="dummy server", clients="the dummy runtime", libraries=("dummy-kernels",))  # fmt: skip

    def transformers_misreads(self, checkpoint: Path) -> bool:
        return True


class GPTQLikeBackend(DummyBackend):
    """Another quantizer whose rungs the profile prices by GPTQ's solve (what the profiler can measure)."""

    name = "gptqlike"
    capabilities = Capabilities(uniform_bits=(2, 3, 4, 8), group_sizes=(32, 64, 128), bitmap="any", cpu=True, gpu=True,
                                needs_calibration=True, own_errors=OwnErrors("gptq", "GPTQ", "one GPTQ solve per module input and rung"))  # fmt: skip


@pytest.fixture
def dummy(monkeypatch):
    monkeypatch.setitem(registry.BACKENDS, "dummy", DummyBackend)
    monkeypatch.setitem(registry.BACKENDS, "gptqlike", GPTQLikeBackend)


def test_a_registered_backend_is_a_choice_of_the_params(dummy):
    assert "dummy" in param_specs()["backends"]["items"]["enum"]
    assert PipelineConfig.from_dict({"backends": ["dummy"]}).backends == ["dummy"]
    with pytest.raises(PipelineError, match="unknown backend"):
        PipelineConfig.from_dict({"backends": ["nobody"]})


def test_a_registered_backend_is_planned_by_its_capabilities(dummy):
    config = PipelineConfig.from_dict({"backends": ["hqq", "dummy"], "uniform_budgets": ["b4g64"], "methods": ["sensiboost", "optimal", "lim"]})
    assert config.profiled_errors == ()
    plan = {s.name: s for s in plan_variants(config)}
    # fused kernels: its bit maps tie q/k/v and gate/up, as awq's and gptq's do
    assert set(plan) == {"uniform-4.25", "SB30-3.25", "SB30-3.25-tied", "optimal-3.25", "optimal-3.25-tied", "lim-3.25", "lim-3.25-tied-memory"}
    assert plan["optimal-3.25-tied"].backends == ("dummy",) and plan["optimal-3.25-tied"].options["tie_fused"] is True

    priced = PipelineConfig.from_dict({"backends": ["hqq", "gptqlike"], "methods": ["optimal"]})
    assert priced.profiled_errors == ("gptq",), "a backend with own rung errors has them profiled"
    plan = {s.name: s for s in plan_variants(priced)}
    assert plan["optimal-3.25-gptq-errors"].backends == ("gptqlike",) and plan["optimal-3.25"].backends == ("hqq",)
    # the rival scores (a backward-pass cost) are profiled when a method reads them: the per-token objective
    # (optimal's default) too, the fisher one not
    assert priced.rival_scores
    assert not PipelineConfig.from_dict({"methods": ["optimal"], "method_options": {"optimal": {"objective": "fisher"}}}).rival_scores
    assert PipelineConfig.from_dict({"methods": ["taylor"]}).rival_scores


def test_the_preflight_announces_what_a_registered_backend_skips_and_costs(dummy):
    config = PipelineConfig.from_dict({"backends": ["hqq", "dummy", "gptqlike"], "uniform_budgets": ["b4g64", "b3g64"], "methods": ["optimal"]})
    notes = backend_notes(config, "llama")
    assert any(n.startswith("dummy will skip uniform b3g64") for n in notes) and not any(n.startswith("dummy will skip uniform b4g64") for n in notes)
    assert any(n.startswith("gptqlike: the profile also prices every rung by GPTQ's own error for optimal on gptqlike") for n in notes)
    assert "dummy will skip every variant: dummy does not quantize phi3 models: dummy kernels need separate q/k/v" in backend_notes(config, "phi3")
    rows = {r["name"]: r for r in planned_variants(config, "llama")}
    assert rows["dummy/uniform/3.25"]["skipped"] and not rows["dummy/uniform/4.25"]["skipped"]
    assert "dummy/optimal/3.25" in rows and "gptqlike/optimal/3.25" in rows


def test_the_mlflow_model_of_a_registered_backend_says_how_it_is_served(dummy, tmp_path):
    from tasks.registry import mlflow_model

    assert mlflow_model.serving("dummy") == "dummy server"
    assert "dummy-kernels" in mlflow_model.requirements("dummy")
    card = mlflow_model.model_card({"name": "dummy/SB30/3.25", "method": "sensiboost", "label": "SB30", "backend": "dummy", "budget_label": "3.25",
                                    "model": {"name": "m", "revision": "r"}}, {}, "m-quantized", "artifacts/checkpoint")  # fmt: skip
    assert "The checkpoint alone (`artifacts/checkpoint/`): the dummy runtime." in card
    model_dir, base = tmp_path / "q", tmp_path / "base"
    model_dir.mkdir(), base.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    out = mlflow_model.stage_checkpoint(model_dir, "dummy", base, {}, tmp_path / "staged")
    assert json.loads((out / "config.json").read_text())["model_type"] == mlflow_model.FOREIGN_MODEL_TYPE, "misread: hidden"
    assert not mlflow_model.transformers_flavored(out, "dummy")


def test_the_backends_declare_what_the_name_tables_said(tmp_path):
    """The facts that were tables keyed by backend name (config, planner, mlflow_model), now each backend's."""
    from tasks.quantize.registry import capabilities, get_backend, own_error_names

    caps = {name: capabilities(name) for name in registry.BACKENDS}
    assert {n for n, c in caps.items() if c.fused_kernels} == {"gptq", "awq"}
    assert own_error_names() == ("gptq", "gguf") and caps["gptq"].own_errors.name == "gptq"
    assert {n for n, c in caps.items() if c.ladder == "gguf"} == {"gguf"}
    assert {n: registry.ladder_of(n) for n in caps} == {n: c.ladder for n, c in caps.items()}, "the light ladder table mirrors the capabilities"
    assert {n: c.serving for n, c in caps.items()} == {"hqq": "mlflow pyfunc", "gptq": "mlflow pyfunc; GPTQModel (uniform maps)",
                                                      "awq": "mlflow transformers; compressed-tensors", "bnb": "mlflow pyfunc; transformers (4-bit maps)",
                                                      "gguf": "llama.cpp (llama-server), Ollama, LM Studio; mlflow pyfunc over llama.cpp"}  # fmt: skip
    assert {n: c.libraries for n, c in caps.items()} == {"hqq": ("hqq",), "gptq": ("gptqmodel",), "awq": ("compressed-tensors",), "bnb": ("bitsandbytes",),
                                                        "gguf": ("llama-cpp-python",)}
    plain, dynamic, int8 = tmp_path / "plain", tmp_path / "dynamic", tmp_path / "int8"
    for d, config in ((plain, {"quantization_config": {}}), (dynamic, {"quantization_config": {"dynamic": {"-:.*": {}}}}), (int8, {})):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
    (int8 / "bnb_layout.json").write_text(json.dumps({"int8_modules": ["model.layers.0.mlp.down_proj"]}))
    misreads = {(n, d.name) for n in caps for d in (plain, dynamic, int8) if get_backend(n).transformers_misreads(d)}
    assert misreads == {("hqq", "plain"), ("hqq", "dynamic"), ("hqq", "int8"), ("gptq", "dynamic")}
    runs = {(n, d.name) for n in caps for d in (plain, dynamic, int8) if get_backend(n).transformers_runs(d)}
    assert runs == {("awq", "plain"), ("awq", "dynamic"), ("awq", "int8"), ("bnb", "plain"), ("bnb", "dynamic")}


@pytest.mark.parametrize(
    "family,config,extra",
    [
        ("llama", {"backends": ["hqq", "gptq"], "methods": ["optimal"]}, {"gptq_errors": True, "rival_scores": True, "taylor_dloss_gptq": True}),
        ("phi3", {"backends": ["hqq", "gptq"], "methods": ["optimal"]}, {"rival_scores": True}),  # gptq refuses phi3: nothing to price
        ("llama", {"backends": ["gptq"], "methods": ["optimal"], "method_options": {"optimal": {"errors": "hqq", "objective": "fisher"}}}, {}),
        ("llama", {"backends": ["hqq"], "methods": ["sensiboost", "taylor"]}, {"rival_scores": True}),
    ],
)
def test_the_profile_is_keyed_by_the_own_rung_errors_it_holds_as_before(family, config, extra, state, tmp_path, monkeypatch):
    """The profiling stage output's key (its cache) names GPTQ's rung errors `gptq_errors`, as it did when
    the orchestration asked for them by name, so that a rerun on an existing state hits its cache."""
    import tasks.profiling
    import tasks.registry.tracking
    from tasks.artifacts import StageOutput, file_sha256
    from tasks.context import StageContext
    from tasks.orchestration import steps
    from tasks.profiling.stage import Profile

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": family, "hidden_size": 64, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2}))  # fmt: skip
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "calibration.safetensors").write_bytes(b"windows")
    asked = {}

    def profiled(model_path, calib, out, **kwargs):
        asked.update(kwargs)
        (Path(out) / "scores.csv").write_text("")

    monkeypatch.setattr(tasks.profiling, "run_profiling", profiled)
    monkeypatch.setattr(tasks.registry.tracking, "log_profile_run", lambda *args: "profile-run")
    monkeypatch.setattr(tasks.registry.tracking, "client_for", lambda uri: type("C", (), {"set_tag": lambda *a: None})())
    ctx = StageContext.from_env()
    cfg = PipelineConfig.from_dict(config)
    prep = {"config": cfg.to_dict(), "model": {"name": "m", "revision": "rev", "path": str(model), "source": str(model)},
            "calibration": {"uri": str(calibration)}, "parent_run_id": "parent"}  # fmt: skip
    scores = Profile.from_json(steps.profile(ctx, prep)).scores
    key = {"model": "rev", "calibration": file_sha256(calibration / "calibration.safetensors"), "fisher_samples": cfg.gradient_windows,
           "format": tasks.profiling.SCORES_FORMAT, **extra}  # fmt: skip
    assert scores == str(StageOutput(ctx.settings.artifact_root, "profiling", key).path / "scores.csv")
    assert asked.get("gptq_errors", False) is ("gptq_errors" in extra) and asked["rival_scores"] is ("rival_scores" in extra)


def _named_tests(source: str, names: set[str]) -> list[str]:
    """Comparisons (==, !=, in, not in) of something with a backend's or method's name, as written in `source`."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            for side in (node.left, *node.comparators):
                values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [f"line {node.lineno}: {v.value!r}" for v in values if isinstance(v, ast.Constant) and v.value in names]
    return found


def test_the_orchestration_tests_no_backend_or_method_name():
    """Planner, pre-flight, steps and the DAG wiring ask the tables (capabilities, method specs, the items'
    own fields); the defaults of the Params may name backends and methods, a comparison may not."""
    from tasks.allocation.methods import METHODS
    from tasks.allocation.plan import BASELINE_METHOD

    names = set(registry.BACKENDS) | set(METHODS) | {registry.UNQUANTIZED, BASELINE_METHOD}
    root = Path(__file__).resolve().parents[1] / "tasks" / "orchestration"
    found = {p.name: hits for p in sorted(root.glob("*.py")) if (hits := _named_tests(p.read_text(), names))}
    assert found == {}


def test_the_name_test_finder_finds_one():
    assert _named_tests("if backend == 'gptq' or m in ('optimal', 'x'):\n    pass\n", {"gptq", "optimal"}) == ["line 1: 'gptq'", "line 1: 'optimal'"]
