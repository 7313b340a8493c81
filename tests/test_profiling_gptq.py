"""GPTQ's rung errors in the profile (tasks/profiling/gptq_errors.py, docs/methods.md §11): the error the
gptq backend's own solver leaves, from the profiler's Gram matrix, and `optimal` priced by it."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("gptqmodel")

from tasks.ladder import Rung  # noqa: E402
from tasks.profiling.gptq_errors import _solver, gptq_rung_errors  # noqa: E402


def test_gptq_rung_errors_are_gptqmodels_own_solve_of_each_module_on_the_data(one_thread):
    """Stacked modules and a Gram matrix in float64 give what GPTQModel computes for each module alone
    from the activations (its add_batch), at a ragged group (96 columns at g64) and a whole one."""
    torch.manual_seed(0)
    x = torch.randn(512, 96) * torch.rand(96) * 3  # uneven feature scales: the error feedback matters
    weights = {"q": torch.randn(24, 96) * 0.05, "k": torch.randn(8, 96) * 0.05}
    rungs = (Rung(3, 64), Rung(4, 32))
    errors = gptq_rung_errors(weights, x.double().T @ x.double(), x.shape[0], rungs)
    for k, rung in enumerate(rungs):
        for name, w in weights.items():
            task = _solver(w.clone(), rung)
            task.add_batch(x[None], None)
            expected = w - task.quantize()[0]
            got = errors[name][k * w.shape[0] : (k + 1) * w.shape[0]]
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_the_profile_prices_every_rung_by_gptqs_error_and_optimal_uses_it(tiny_model_dir, tmp_path, one_thread):
    from tasks.allocation import read_scores
    from tasks.allocation.optimal import allocate_optimal, predicted_loss_increase
    from tasks.profiling import run_profiling

    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    scores = read_scores(run_profiling(tiny_model_dir, ids, tmp_path / "p", fisher_samples=2, gptq_errors=True))
    frame = scores.frame
    assert frame["out_err_gptq"].notna().all() and frame["fisher_dloss_gptq"].notna().all()
    # GPTQ minimizes this output error on these inputs (HQQ does not look at them): typically well below HQQ's
    assert (frame["out_err_gptq"] / frame["out_err"]).median() < 0.9
    hqq, gptq = allocate_optimal(scores, 3.5), allocate_optimal(scores, 3.5, errors="gptq")
    assert gptq.nominal_bpp <= 3.5 and gptq.options["error"] == "fisher_dloss_gptq"
    assert predicted_loss_increase(scores, gptq, "gptq") <= predicted_loss_increase(scores, hqq, "gptq")
    plain = read_scores(run_profiling(tiny_model_dir, ids, tmp_path / "plain", fisher_samples=2))
    for column in ("out_err", "fisher_dloss", "kurtosis", "sensitivity"):  # the opt-in pass changes no other score
        assert plain.frame[column].tolist() == frame[column].tolist(), column
    with pytest.raises(Exception, match="out_err_gptq"):
        allocate_optimal(plain, 3.5, objective="output", errors="gptq")


def test_gptqs_errors_priced_per_token_match_a_whole_model_reference(tiny_model_dir, tmp_path, one_thread):
    """taylor_dloss_gptq: ModelOpt's 1/2 sum_t sum_o g^2 dY^2 per gradient token, with dY from GPTQ's own
    error at each rung (its solve on the Gram matrix of every calibration token), against plain autograd on
    the whole model; the backward pass rebuilds GPTQ's errors from the Gram matrices the forward pass stashed."""
    import json

    import pandas as pd
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from tasks.profiling import run_profiling
    from tests.test_profiling_stream import inputs_and_output_gradients

    ids = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    rungs, windows = (Rung(3, 64), Rung(4, 64)), 2
    df = pd.read_csv(run_profiling(tiny_model_dir, ids, tmp_path / "p", rungs=rungs, fisher_samples=windows, gptq_errors=True, rival_scores=True))
    assert df["taylor_dloss_gptq"].notna().all()
    assert json.loads((tmp_path / "p" / "profiling.json").read_text())["phase_seconds"]["gptq"] > 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    every = inputs_and_output_gradients(model, ids)  # inputs over every calibration token: GPTQ's Gram matrix
    grads = inputs_and_output_gradients(model, ids[:windows])
    for (i, m), rows in df.groupby(["layer", "module"]):
        x_all = every[f"{i}.{m}"][0].reshape(-1, every[f"{i}.{m}"][0].shape[-1]).double()
        x, g = grads[f"{i}.{m}"]
        w = model.model.layers[i].get_submodule(m).weight.detach()
        errors = gptq_rung_errors({m: w}, x_all.T @ x_all, x_all.shape[0], rungs)[m]
        for k, rung in enumerate(rungs):
            err = errors[k * w.shape[0] : (k + 1) * w.shape[0]].double()
            expected = 0.5 * (g.double().square() * F.linear(x.double(), err).square()).sum().item() / ids[:windows].numel()
            row = rows[(rows.nbit1 == rung.bits) & (rows.gsize1 == rung.group_size)].iloc[0]
            assert row.taylor_dloss_gptq == pytest.approx(expected, rel=2e-3), (i, m, rung.name)
        # GPTQ's error differs from plain rounding's: the column is not the HQQ one under another name
        assert rows.taylor_dloss_gptq.tolist() != pytest.approx(rows.taylor_dloss.tolist(), rel=1e-2)
