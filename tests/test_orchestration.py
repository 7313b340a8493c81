"""The pipeline's wiring: the step table (written once, consistent with the step functions), the pure
variant planner, the method table, the config's validation, the step CLI and the step context."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.allocation.methods import METHODS
from tasks.errors import PipelineError
from tasks.ladder import parse_rung
from tasks.orchestration.config import BACKEND_NAMES, PROTOCOL_NAMES, PipelineConfig
from tasks.context import StageContext
from tasks.allocation.plan import VariantSpec, allocate_variants, memory_matches, plan_variants, variant_name
from tasks.orchestration.step_table import CONF, STEPS

REPO = Path(__file__).resolve().parent.parent


# ---- the step table ------------------------------------------------------------------------------


def test_every_step_function_takes_a_context_and_its_inputs():
    for step in STEPS:
        params = list(inspect.signature(step.resolve()).parameters)
        assert params[0] == "ctx", step.name
        assert len(params) == 1 + len(step.inputs), (step.name, params, step.inputs)


def test_the_step_order_is_written_in_one_place():
    """No file but the step table lists the steps in order (the DAG, the runner, the step CLI, the
    image table and the docs derive from it)."""
    names = [s.name for s in STEPS]
    pattern = re.compile(r"""["']prepare["'],\s*["']profile["'],\s*["']allocate["']""")
    hits = []
    for path in [*REPO.glob("tasks/**/*.py"), *REPO.glob("dags/*.py"), *REPO.glob("containers/**/*.json"), *REPO.glob("benchmarks/*.py")]:
        if path.name != "step_table.py" and pattern.search(path.read_text()):
            hits.append(str(path.relative_to(REPO)))
    assert hits == [], f"step lists outside the step table: {hits}"
    assert names[0] == "prepare" and names[-1] == "finish"


def test_a_gpu_step_gets_the_gpu_only_where_torch_sees_one(monkeypatch):
    monkeypatch.delenv("QUANT_DEVICE", raising=False)
    assert StageContext.from_env(gpu=False).device == "cpu"
    import torch

    assert StageContext.from_env(gpu=True).device == ("cuda" if torch.cuda.is_available() else "cpu")
    env = {"QUANT_DEVICE": "cuda:1", "AIRFLOW_CTX_DAG_ID": "quantization_pipeline", "AIRFLOW_CTX_DAG_RUN_ID": "manual__1"}
    ctx = StageContext.from_env(gpu=False, env=env)
    assert ctx.device == "cuda:1"
    assert ctx.run_tags == {"airflow_dag_id": "quantization_pipeline", "airflow_dag_run_id": "manual__1"}


def test_the_step_cli_says_in_one_line_what_a_step_takes(tmp_path):
    def step(*args):
        return subprocess.run([sys.executable, "-m", "tasks", "step", *args], cwd=REPO, capture_output=True, text=True, timeout=120)

    out = step("allocate", "--input", json.dumps({"config": {}}), "--output", str(tmp_path / "x.json"))
    assert out.returncode == 2 and out.stderr.strip() == "error: step allocate takes 2 inputs (prepare, profile) as a JSON list"
    out = step("profile", "--input", "{not json", "--output", str(tmp_path / "x.json"))
    assert out.returncode == 2 and out.stderr.startswith("error: --input is not valid JSON") and "Traceback" not in out.stderr
    out = step("profile", "--input", str(tmp_path / "missing.json"), "--output", str(tmp_path / "x.json"))
    assert out.returncode == 2 and out.stderr.startswith("error: --input is neither inline JSON nor an existing file") and "Traceback" not in out.stderr


def test_run_inprocess_walks_the_table(monkeypatch, state):
    """The in-process runner feeds each step what the table says: mapped steps once per variant,
    unmapped steps after a mapped one the whole list."""
    from tasks.orchestration import runner
    from tasks.orchestration.step_table import Step

    calls = []
    table = (
        Step("a", "x:a", (CONF,)),
        Step("b", "x:b", ("a",)),
        Step("c", "x:c", ("b",), mapped=True),
        Step("d", "x:d", ("a", "c")),
    )
    fns = {
        "a": lambda ctx, conf: {"conf": conf},
        "b": lambda ctx, a: [{"name": "v1"}, {"name": "v2"}],
        "c": lambda ctx, v: {**v, "done": True},
        "d": lambda ctx, a, cs: {"a": a, "cs": cs},
    }
    monkeypatch.setattr(runner, "STEPS", table)
    monkeypatch.setattr(Step, "resolve", lambda self: lambda ctx, *args: calls.append(self.name) or fns[self.name](ctx, *args))
    result = runner.run_inprocess({"model": "m"}, ctx=StageContext.from_env())
    assert calls == ["a", "b", "c", "c", "d"]
    assert result == {"a": {"conf": {"model": "m"}}, "cs": [{"name": "v1", "done": True}, {"name": "v2", "done": True}]}


# ---- variants and methods ------------------------------------------------------------------------


def test_plan_variants_uniform_first_then_boost_then_the_rest():
    config = PipelineConfig.from_dict({"backends": ["hqq"], "uniform_budgets": ["b4g64"], "methods": ["mxq", "kurtboost", "optimal"], "budgets": ["b3g64"],
                                       "method_options": {"kurtboost": {"top_m": 0}}})  # fmt: skip
    specs = plan_variants(config)
    assert [s.name for s in specs] == ["uniform-4.25", "KB20-3.25", "mxq-3.25", "optimal-3.25"]
    assert specs[1].options == {"boost_stop": 2, "top_m": 0}, "the user's options over the method's defaults"
    assert specs[1].budget == parse_rung("b3g64")
    exact = plan_variants(PipelineConfig.from_dict({"backends": ["hqq"], "uniform_budgets": [], "methods": ["optimal"], "budgets": ["3.4"]}))
    assert [(s.name, s.budget) for s in exact] == [("optimal-3.40", 3.4)]


def test_budget_exact_methods_get_the_memory_the_boost_method_reached():
    from tasks.allocation.scores import scores_from_frame
    from test_allocation import make_table

    table = scores_from_frame(make_table(n_layers=12, seed=1))
    specs = [VariantSpec.of("sensiboost", parse_rung("b3g64")), VariantSpec.of("mxq", parse_rung("b3g64"))]
    sb, mxq = allocate_variants(specs, table, table.params)
    assert mxq.target == sb.bitmap.nominal_bpp
    assert mxq.bitmap.nominal_bpp <= sb.bitmap.nominal_bpp + 1e-9
    assert (sb.matched, mxq.matched) == (None, "SB30") and [p.matched for p in (sb, mxq)] == memory_matches(specs)
    _, alone = allocate_variants(specs, table, table.params, match_boost_memory=False)
    assert alone.target == parse_rung("b3g64").bpp and alone.matched is None


def _names(config: dict, backend: str = "hqq") -> list[str]:
    """The variant names a run of `config` gives on one backend, as allocate names them."""
    cfg = PipelineConfig.from_dict({"uniform_budgets": ["b4g64"], "backends": [backend], **config})
    specs = plan_variants(cfg, profiled_errors=())
    return [variant_name(backend, s.label, s.budget_label, m) for s, m in zip(specs, memory_matches(specs, cfg.match_boost_memory))]


def test_a_variant_name_says_whose_memory_a_budget_exact_method_was_given():
    """Two runs with other method sets on one MLflow store never give two different models one name: optimal
    at a rung alone gets the rung's bpp, beside a boost method that boost method's memory (and says so)."""
    alone = _names({"methods": ["optimal", "mxq"]})
    with_boost = _names({"methods": ["sensiboost", "optimal", "mxq"]})
    kurt_first = _names({"methods": ["kurtboost", "sensiboost", "optimal"]})
    assert alone == ["hqq/uniform/4.25", "hqq/optimal/3.25", "hqq/mxq/3.25"]
    assert with_boost == ["hqq/uniform/4.25", "hqq/SB30/3.25", "hqq/optimal/3.25@SB30", "hqq/mxq/3.25@SB30"]
    assert kurt_first == ["hqq/uniform/4.25", "hqq/KB21/3.25", "hqq/SB30/3.25", "hqq/optimal/3.25@KB21"], "the first boost method's"
    assert "hqq/optimal/3.25" not in with_boost and set(alone) & set(with_boost) == {"hqq/uniform/4.25"}
    # uniform and boost names are unchanged; so is a budget-exact method's at a budget that is no rung, or unmatched
    assert _names({"methods": ["sensiboost", "optimal"], "budgets": ["b3g64", "b4g64"]})[1:] == [
        "hqq/SB30/3.25", "hqq/SB30/4.25", "hqq/optimal/3.25@SB30", "hqq/optimal/4.25@SB30"]  # fmt: skip
    assert _names({"methods": ["optimal"], "budgets": ["3.4"]})[1:] == ["hqq/optimal/3.40"]
    assert _names({"methods": ["sensiboost", "optimal"], "match_boost_memory": False})[2] == "hqq/optimal/3.25"
    # on gptq, optimal's tied map is given the tied SB30's memory
    assert _names({"backends": ["gptq"], "methods": ["sensiboost", "optimal"]}, "gptq")[1:] == ["gptq/SB30/3.25", "gptq/optimal/3.25@SB30"]


def test_different_bit_maps_of_one_allocation_never_share_a_file_stem():
    config = PipelineConfig.from_dict({"backends": ["hqq", "gptq"], "uniform_budgets": [], "methods": ["sensiboost", "lim"],
                                       "method_options": {"sensiboost": {"tie_experts": True}}})  # fmt: skip
    lim = [s for s in plan_variants(config, profiled_errors=()) if s.method == "lim"]
    assert [(s.name, s.backends) for s in lim] == [("lim-3.25-experts-tied-memory", ("hqq",)), ("lim-3.25-tied-experts-tied-memory", ("gptq",))]
    with pytest.raises(PipelineError, match="both be named 'optimal-3.40'"):
        plan_variants(PipelineConfig.from_dict({"methods": ["optimal"], "budgets": ["3.401", "3.404"]}))


def test_layerwise_methods_match_the_memory_of_the_tied_boost_map_on_tied_backends():
    """On gptq, SB30's bit map is tied (q/k/v, gate/up on one rung) and reaches another memory than on hqq:
    lim and zd are compared with the SB30 of their own backend."""
    from tasks.allocation.scores import scores_from_frame
    from test_allocation import make_table

    table = scores_from_frame(make_table(n_layers=12, seed=3))  # SB30 boosts a layer here
    for backends in (["hqq", "gptq"], ["gptq"]):
        config = PipelineConfig.from_dict({"backends": backends, "uniform_budgets": [], "methods": ["sensiboost", "lim", "zd"], "budgets": ["b3g64"]})
        planned = {p.spec.name: p for p in allocate_variants(plan_variants(config, profiled_errors=()), table, table.params)}
        tied = planned["SB30-3.25-tied"].bitmap.nominal_bpp
        assert tied > parse_rung("b3g64").bpp + 0.01
        for method in ("lim", "zd"):
            assert planned[f"{method}-3.25-tied-memory"].target == tied, (backends, method)
            if "hqq" in backends:
                assert planned[f"{method}-3.25"].target == planned["SB30-3.25"].bitmap.nominal_bpp
        gptq = {p.spec.name for p in planned.values() if "gptq" in (p.spec.backends or backends)}
        assert gptq == {"SB30-3.25-tied", "lim-3.25-tied-memory", "zd-3.25-tied-memory"}


def test_the_method_table_matches_the_allocators():
    from tasks.allocation.registry import ALLOCATORS

    assert set(ALLOCATORS) == set(METHODS)
    for name, spec in METHODS.items():
        signature = inspect.signature(ALLOCATORS[name]).parameters
        for option, value in spec.defaults.items():
            assert signature[option].default == value, (name, option)
    assert METHODS["sensiboost"].label() == "SB30" and METHODS["kurtboost"].label({"boost_stop": 3}) == "KB31"


def test_the_config_names_what_the_stages_accept():
    from tasks.evaluation.perplexity import PROTOCOLS
    from tasks.quantize.registry import BACKENDS

    assert set(BACKEND_NAMES) == set(BACKENDS)
    assert set(PROTOCOL_NAMES) == set(PROTOCOLS)
    from tasks.orchestration.config import PROTOCOL_MIN_TOKENS

    assert PROTOCOL_MIN_TOKENS == {name: p.max_length for name, p in PROTOCOLS.items()}, "one window of each protocol"


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"methods": ["sensiboost"], "budgets": ["3.4"]}, "sensiboost needs a ladder rung as budget"),
        ({"protocols": ["lambada"]}, "unknown perplexity protocol"),
        ({"budgets": "b3g64"}, "Param budgets: must be a list"),
        ({"method_options": []}, "Param method_options: must be a mapping"),
        ({"eval_tokens": "many"}, "Param eval_tokens: must be an integer"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_configs_are_one_line_errors(bad, message):
    with pytest.raises(PipelineError, match=message):
        PipelineConfig.from_dict(bad)


def test_backends_that_serve_fused_kernels_get_tied_bit_maps():
    config = PipelineConfig.from_dict({"backends": ["hqq", "gptq", "awq"], "uniform_budgets": ["b4g64"], "methods": ["sensiboost", "optimal", "lim"]})
    plan = {s.name: s for s in plan_variants(config, profiled_errors=())}
    assert set(plan) == {"uniform-4.25", "SB30-3.25", "SB30-3.25-tied", "optimal-3.25", "optimal-3.25-tied", "lim-3.25", "lim-3.25-tied-memory"}
    assert plan["optimal-3.25-tied"].backends == ("gptq", "awq") and plan["optimal-3.25-tied"].options["tie_fused"] is True
    assert plan["optimal-3.25"].backends == ("hqq",) and "tie_fused" not in plan["optimal-3.25"].options
    # whole layers move together (nothing to tie), but each at the memory its backends' SB30 reached
    assert plan["lim-3.25"].backends == ("hqq",) and plan["lim-3.25-tied-memory"].backends == ("gptq", "awq")
    assert "tie_fused" not in plan["lim-3.25-tied-memory"].options and plan["lim-3.25-tied-memory"].ties == (True, False)
    explicit = PipelineConfig.from_dict({"backends": ["hqq", "gptq"], "methods": ["optimal"], "method_options": {"optimal": {"tie_fused": False}}})
    assert [(s.name, s.backends) for s in plan_variants(explicit, profiled_errors=()) if s.method == "optimal"] == [("optimal-3.25", None)]
    hqq_only = PipelineConfig.from_dict({"backends": ["hqq"], "methods": ["optimal"]})
    assert [(s.name, s.backends, s.options) for s in plan_variants(hqq_only) if s.method == "optimal"] == [("optimal-3.25", None, {})]


def test_optimal_on_gptq_prices_the_rungs_by_gptqs_own_error():
    config = PipelineConfig.from_dict({"backends": ["hqq", "gptq", "awq"], "methods": ["sensiboost", "optimal"]})
    assert config.profiled_errors == ("gptq",), "a run with gptq and optimal profiles GPTQ's rung errors"
    plan = {s.name: s for s in plan_variants(config) if s.method == "optimal"}
    assert set(plan) == {"optimal-3.25", "optimal-3.25-tied", "optimal-3.25-tied-gptq-errors"}
    assert plan["optimal-3.25-tied-gptq-errors"].backends == ("gptq",) and plan["optimal-3.25-tied-gptq-errors"].options["errors"] == "gptq"
    assert plan["optimal-3.25-tied"].backends == ("awq",) and "errors" not in plan["optimal-3.25-tied"].options
    assert all("errors" not in s.options for s in plan_variants(config) if s.method != "optimal"), "only optimal takes them"
    off = PipelineConfig.from_dict({"backends": ["gptq"], "methods": ["optimal"], "method_options": {"optimal": {"errors": "hqq"}}})
    assert not off.profiled_errors and [s.options.get("errors") for s in plan_variants(off) if s.method == "optimal"] == ["hqq"]
    asked = PipelineConfig.from_dict({"backends": ["hqq"], "methods": ["optimal"], "method_options": {"optimal": {"errors": "gptq"}}})
    assert asked.profiled_errors == ("gptq",) and not PipelineConfig.from_dict({"backends": ["gptq"], "methods": ["sensiboost"]}).profiled_errors
    with pytest.raises(PipelineError, match="errors"):
        PipelineConfig.from_dict({"methods": ["optimal"], "method_options": {"optimal": {"errors": "awq"}}})
