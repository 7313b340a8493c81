"""Pure numerics of the profiling stage: kurtosis, ZD, LIM sums, Gram matrices, output errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from tasks.profiling.activations import Gram, QuadraticForm, cosine_sum, quadratic_error, squared_error
from tasks.profiling.weights import kurtosis, zd_fraction


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", ["normal", "student_t", "outliers"])
def test_kurtosis_equals_scipy_pearson(kind):
    gen = np.random.default_rng(1)
    if kind == "normal":
        w = gen.normal(size=(96, 64))
    elif kind == "student_t":
        w = gen.standard_t(3, size=(96, 64))
    else:
        w = gen.normal(scale=0.02, size=(96, 64))
        w[3, 5] = 1.5  # one outlier: kurtosis far above 3
    w32 = torch.tensor(w, dtype=torch.float32)
    expected = scipy.stats.kurtosis(w32.double().numpy().ravel(), fisher=False, bias=True)
    assert kurtosis(w32) == pytest.approx(expected, rel=1e-10)
    if kind == "outliers":
        assert kurtosis(w32) > 100


def test_kurtosis_of_constant_matrix_is_nan_like_scipy():
    assert math.isnan(kurtosis(torch.ones(8, 8)))


def test_zd_known_fraction_pooled_over_matrices():
    # 99 zeros and one 10: mean 0.1, std 0.995 -> only the 10 has z > 1, whichever matrix holds it.
    a = torch.zeros(10, 5)
    b = torch.zeros(50)
    b[7] = 10.0
    assert zd_fraction([a, b]) == pytest.approx(1 / 100)
    # +-1 in equal numbers: z is exactly +-1, and the rule is strict (z > 1).
    assert zd_fraction([torch.tensor([1.0, -1.0] * 8)]) == 0.0
    # Four values 0,0,0,4 and 0,0,0,4 pooled: mean 1, std sqrt(3): z(4) = 1.73 -> 2 of 8.
    assert zd_fraction([torch.tensor([0.0, 0, 0, 4]), torch.tensor([[0.0, 0], [0, 4]])]) == pytest.approx(2 / 8)


def test_zd_gaussian_is_one_sided_tail():
    w = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    assert zd_fraction([w[:100_000], w[100_000:]]) == pytest.approx(1 - scipy.stats.norm.cdf(1), abs=3e-3)


def test_cosine_sum_identity_and_opposite():
    h = torch.randn(3, 7, 16)
    assert -cosine_sum(h, h) / 21 == pytest.approx(-1.0, abs=1e-6)  # a layer that returns its input: LIM = -1
    assert -cosine_sum(h, -h) / 21 == pytest.approx(1.0, abs=1e-6)
    orth_in = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    orth_out = torch.tensor([[0.0, 3.0], [5.0, 0.0]])
    assert cosine_sum(orth_in, orth_out) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("dim", [5, 64, 300, 600])
def test_gram_equals_xtx_over_batches(dim):
    gen = torch.Generator().manual_seed(dim)
    xs = [torch.randn(2, 9, dim, generator=gen) for _ in range(3)]
    gram = Gram(dim, block=128)
    for x in xs:
        gram.update(x)
    flat = torch.cat([x.reshape(-1, dim) for x in xs]).double()
    assert gram.tokens == 54
    torch.testing.assert_close(gram.matrix(torch.float64), flat.t() @ flat, rtol=1e-5, atol=1e-4)
    h = gram.matrix()
    assert torch.equal(h, h.t())


def test_quadratic_error_is_summed_squared_output_error():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 24, generator=gen)
    dw = torch.randn(12, 24, generator=gen) * 0.1
    direct = (x @ dw.t()).double().square().sum().item()
    h = (x.t() @ x).float()
    assert quadratic_error(dw, h) == pytest.approx(direct, rel=1e-5)
    assert quadratic_error(dw, h, out=torch.empty(12, 24)) == pytest.approx(direct, rel=1e-5)


def test_squared_error():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert squared_error(a, b) == pytest.approx(13.0)


@pytest.mark.parametrize("tokens", [200, 20])  # 20 < 48 features: H is singular, the plain product is used
def test_quadratic_form_row_sums(tokens):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 48, generator=gen) * torch.linspace(0.1, 3.0, 48)
    d = torch.randn(30, 48, generator=gen) * 0.05
    form = QuadraticForm((x.t() @ x).double(), block=16)
    assert (form.factor is None) == (tokens < 48)
    direct = (x.double() @ d.double().t()).square().sum(dim=0)
    torch.testing.assert_close(form.row_sums(d), direct, rtol=1e-4, atol=1e-9)
    assert form.total(d) == pytest.approx(direct.sum().item(), rel=1e-5)
