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
