"""The sNTK in GPyTorch: a covariance of a MultivariateNormal and of exact GP solves, against
dense float64 values; the docs page on kernel regression runs as a test."""

import pathlib
import re

import linear_operator
import pytest
import torch

import lanczos_ntk as lnk
from lanczos_ntk.testing import dense_operator

gpytorch = pytest.importorskip("gpytorch")

F64 = torch.float64
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def big():
    """M = 2000 states (4 trials × 50 steps × 10 units), P = 130."""
    model = lnk.models.CTRNN(10, 2, seed=0).double()
    u = 0.5 * torch.randn(4, 50, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    K = lnk.StateNTK(model, u)
    return K, dense_operator(K.dual(), block=130), model, u


def _dense_K(K):
    return dense_operator(K, block=500)


def test_multivariate_normal_on_the_sntk_matches_dense(big):
    K, _, _, _ = big
    M, s2 = K.shape[0], 0.1
    D = _dense_K(K) + s2 * torch.eye(M, dtype=F64)
    mvn = gpytorch.distributions.MultivariateNormal(
        torch.zeros(M, dtype=F64), K.add_diagonal(torch.tensor(s2, dtype=F64))
    )
    ref = torch.distributions.MultivariateNormal(torch.zeros(M, dtype=F64), covariance_matrix=D)
    y = torch.randn(M, dtype=F64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(mvn.variance, torch.diagonal(D), rtol=1e-12, atol=1e-12)
    lo, hi = mvn.confidence_region()
    torch.testing.assert_close(hi - lo, 4 * torch.diagonal(D).sqrt(), rtol=1e-12, atol=1e-12)
    lp, lp_ref = float(mvn.log_prob(y)), float(ref.log_prob(y))
    assert abs(lp - lp_ref) < 1e-10 * abs(lp_ref)  # exact through the P × P Gram (Woodbury)
    # the gradient in the noise level, as GP training needs it
    noise = torch.tensor(s2, dtype=F64, requires_grad=True)
    gpytorch.distributions.MultivariateNormal(torch.zeros(M, dtype=F64), K.add_diagonal(noise)).log_prob(
        y
    ).backward()
    ref_noise = torch.tensor(s2, dtype=F64, requires_grad=True)
    torch.distributions.MultivariateNormal(
        torch.zeros(M, dtype=F64), covariance_matrix=D + (ref_noise - s2) * torch.eye(M, dtype=F64)
    ).log_prob(y).backward()
    torch.testing.assert_close(noise.grad, ref_noise.grad, rtol=1e-9, atol=0)


def test_exact_gp_solve_with_default_settings(big):
    K, _, _, _ = big
    M, s2 = K.shape[0], 0.1
    D = _dense_K(K) + s2 * torch.eye(M, dtype=F64)
    b = torch.randn(M, 2, dtype=F64, generator=torch.Generator().manual_seed(3))
    C = K.add_diagonal(torch.tensor(s2, dtype=F64))
    assert isinstance(C, lnk.NTKPlusNoise)
    x = linear_operator.solve(C, b)
    torch.testing.assert_close(x, torch.linalg.solve(D, b), rtol=1e-8, atol=1e-10)
    G = K.dual()  # the dual side: (G + σ²I)⁻¹ directly
    DG = dense_operator(G, block=130) + s2 * torch.eye(G.shape[0], dtype=F64)
    c = torch.randn(G.shape[0], dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        torch.linalg.solve(G.add_diagonal(torch.tensor(s2, dtype=F64)), c),
        torch.linalg.solve(DG, c),
        rtol=1e-8,
        atol=1e-10,
    )


def test_kernel_regression_page_agrees_with_training_the_linearised_model():
    text = (DOCS / "gp.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) == 2
    ns: dict = {}
    exec(compile(blocks[0], "gp.md", "exec"), ns)
    assert float(ns["moved"]) > 0.01  # training did move the states
    assert float(ns["gap"]) < 1e-7 * float(ns["moved"]) * 1e3
    assert float(ns["held_out_gap"]) < 1e-6
    exec(compile(blocks[1], "gp.md", "exec"), ns)


def test_gaussian_likelihood_adds_its_noise_exactly(big):
    K, _, _, _ = big
    M = K.shape[0]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.2
    prior = gpytorch.distributions.MultivariateNormal(torch.zeros(M, dtype=F64), K)
    marginal = likelihood(prior)
    assert isinstance(marginal.lazy_covariance_matrix, lnk.NTKPlusNoise)
    y = torch.randn(M, dtype=F64, generator=torch.Generator().manual_seed(5))
    D = _dense_K(K) + float(likelihood.noise.detach()) * torch.eye(M, dtype=F64)
    ref = torch.distributions.MultivariateNormal(torch.zeros(M, dtype=F64), covariance_matrix=D)
    torch.testing.assert_close(marginal.log_prob(y), ref.log_prob(y), rtol=1e-10, atol=0)
