"""`optimal`'s refinement (tasks/allocation/refine.py): EvoPress's search from the knapsack's map, judged by a
measured fitness with multi-stage selection; and its measurement, the held-out KLD of the quantized model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tasks.allocation.knapsack import ChoiceKnapsack
from tasks.allocation.refine import RefineSettings, search
from tasks.errors import PipelineError
from tasks.ladder import Rung

_RUNGS = (Rung(2, 64), Rung(3, 64), Rung(4, 64), Rung(8, 64))


def _problem(seed: int = 0, items: int = 12, rungs: int = 4):
    rng = np.random.default_rng(seed)
    sizes = np.sort(rng.integers(10, 40, (items, rungs)), axis=1) * np.arange(1, rungs + 1)
    estimate = np.sort(rng.uniform(0, 1, (items, rungs)), axis=1)[:, ::-1] * rng.uniform(0.5, 2, (items, 1))
    truth = estimate * rng.uniform(0.5, 1.5, estimate.shape)  # the estimate is right on average, wrong per item
    capacity = int(sizes[:, 1].sum())
    return estimate, truth, sizes, capacity


def _fitness(truth, calls):
    def fitness(choice, tokens):
        calls.append(tokens)
        noise = 0.02 * np.sin(1000 * choice.sum() + tokens) * 2048 / tokens  # noisier on fewer tokens
        return float(truth[np.arange(len(choice)), choice].sum()) + noise

    return fitness


def test_the_search_keeps_the_budget_and_never_ends_worse_on_the_most_tokens():
    estimate, truth, sizes, capacity = _problem()
    start, _ = ChoiceKnapsack(estimate, sizes).solve(capacity)
    calls = []
    settings = RefineSettings(generations=30, offspring=6, stages=(2048, 16384), survivors=2, seed=1)
    choice, facts = search(estimate, sizes, capacity, start, _fitness(truth, calls), settings)
    assert sizes[np.arange(len(choice)), choice].sum() <= capacity
    fit = _fitness(truth, [])
    assert fit(choice, 16384) <= fit(start, 16384)
    assert facts["holdout_kld"] == pytest.approx(fit(choice, 16384)) and facts["holdout_kld_start"] == pytest.approx(fit(start, 16384))
    assert facts["generations_run"] == 30 and facts["accepted"] >= 1 and facts["moved_items"] == int((choice != start).sum())
    # the measurement decides: the truth's own optimum is what the search moves toward
    best, _ = ChoiceKnapsack(truth, sizes).solve(capacity)
    assert truth[np.arange(len(choice)), choice].sum() < truth[np.arange(len(start)), start].sum()
    assert truth[np.arange(len(best)), best].sum() <= truth[np.arange(len(choice)), choice].sum() + 1e-9
    # multi-stage: most measurements are on the first stage's tokens
    assert calls.count(2048) > calls.count(16384)
    again, _ = search(estimate, sizes, capacity, start, _fitness(truth, []), settings)
    assert np.array_equal(again, choice)  # seeded


def test_the_search_stops_at_its_time_cap_and_keeps_the_start_when_nothing_beats_it():
    estimate, _, sizes, capacity = _problem(seed=2)
    start, _ = ChoiceKnapsack(estimate, sizes).solve(capacity)
    exact = lambda choice, tokens: float(estimate[np.arange(len(choice)), choice].sum())  # noqa: E731  the estimate is the truth
    choice, facts = search(estimate, sizes, capacity, start, exact, RefineSettings(generations=5, offspring=4, stages=(64,), seed=0))
    assert np.array_equal(choice, start) and facts["accepted"] == 0 and facts["generations_run"] == 5
    _, facts = search(estimate, sizes, capacity, start, exact, RefineSettings(generations=10**6, seconds=0.2, stages=(64,)))
    assert facts["generations_run"] < 10**6 and facts["search_seconds"] < 5


def test_refine_settings_and_where_refine_is_refused():
    from tasks.allocation import allocate
    from tasks.allocation.methods import check_options
    from tests.test_allocation import make_table, scores_from_frame

    assert RefineSettings.of(False) is None and RefineSettings.of(True) == RefineSettings()
    assert RefineSettings.of({"generations": 3, "stages": [512, 4096]}).stages == (512, 4096)
    with pytest.raises(PipelineError, match="stages must grow"):
        RefineSettings.of({"stages": [4096, 512]})
    with pytest.raises(PipelineError, match="optimal option refine"):
        check_options("optimal", {"refine": {"generation": 3}})
    s = scores_from_frame(make_table(n_layers=2, seed=9))
    with pytest.raises(PipelineError, match="refine measures the model: the pipeline's allocation stage applies it"):
        allocate(s, "optimal", 3.4, {"refine": True})
    assert allocate(s, "optimal", 3.4, {"refine": False}).modules == allocate(s, "optimal", 3.4, {}).modules


def test_refine_on_a_real_model_measures_held_out_kld_within_the_budget(tiny_model_dir, tmp_path, one_thread):
    """The whole refinement on a tiny Llama with HQQ: the held-out KLD of the refined map is measured by
    the model itself and is never above the knapsack map's, at the same budget."""
    from tasks.allocation import read_scores
    from tasks.allocation.heldout_kld import HeldoutKld, backend_quantizer
    from tasks.allocation.optimal import allocate_optimal
    from tasks.allocation.refine import refine_bitmap
    from tasks.calibration import holdout_windows, sample_windows
    from tasks.profiling import run_profiling

    text = torch.randint(0, 49152, (1, 8192), generator=torch.Generator().manual_seed(0))
    ids = sample_windows(text, 4, 64, seed=0)
    scores = read_scores(run_profiling(tiny_model_dir, ids, tmp_path / "p", fisher_samples=2, rungs=_RUNGS))
    options = {"rungs": [r.name for r in _RUNGS], "refine": {"generations": 3, "offspring": 3, "stages": [126, 504]}}
    start = allocate_optimal(scores, 3.6, rungs=options["rungs"])
    fitness = HeldoutKld(tiny_model_dir, holdout_windows(text, 4, 64, seed=0), backend_quantizer("hqq"), 504)
    refined = refine_bitmap(start, scores, options, fitness)
    assert refined.nominal_bpp <= 3.6 and refined.budget == start.budget
    facts = refined.options["refine"]
    assert facts["holdout_kld"] <= facts["holdout_kld_start"] and facts["generations_run"] == 3
    assert facts["holdout_kld_start"] == pytest.approx(fitness(start.modules, 504))  # the fitness is the model's, re-measurable
    assert fitness(refined.modules, 504) == pytest.approx(facts["holdout_kld"])
    with pytest.raises(PipelineError, match="bnb backend's quantizer is not reproduced"):
        backend_quantizer("bnb")


def test_the_gptq_refinement_quantizes_as_the_profile_prices(tiny_model_dir, one_thread):
    """refine on gptq: each module quantized by GPTQModel's solver on its input's Gram matrix over the
    calibration windows: W - Q is exactly the profile's GPTQ error for that module and rung."""
    pytest.importorskip("gptqmodel")
    from tasks.allocation.heldout_kld import backend_quantizer, input_grams
    from tasks.model_io import load_model, quantizable_linears
    from tasks.profiling.gptq_errors import gptq_rung_errors

    ids = torch.randint(0, 49152, (3, 32), generator=torch.Generator().manual_seed(2))
    quantize = backend_quantizer("gptq", checkpoint=tiny_model_dir, calibration=ids)
    grams, tokens = input_grams(tiny_model_dir, ids)
    assert tokens == 96 and set(grams) == {f"{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")}
    w, rung = quantizable_linears(load_model(tiny_model_dir))["1.self_attn.v_proj"].weight.detach(), Rung(3, 64)
    # the Gram matrix is v's own input's (q, k and v share it)
    x = _forward_inputs(tiny_model_dir, ids, "1.self_attn.q_proj")
    torch.testing.assert_close(grams["1.self_attn.q_proj"].double(), x.T @ x, rtol=1e-5, atol=1e-4)
    expected = w - gptq_rung_errors({"v": w}, x.T @ x, tokens, (rung,))["v"]
    torch.testing.assert_close(quantize("1.self_attn.v_proj", w, rung), expected, rtol=0, atol=1e-5)


def _forward_inputs(path, ids, key):
    from tasks.model_io import load_model, quantizable_linears

    model, seen = load_model(path), []
    quantizable_linears(model)[key].register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    return torch.cat(seen)
