"""Low-rank natural gradient: one step against the dense formula, refresh schedule, errors."""

from __future__ import annotations

import pytest
import torch

from lanczos_ntk.models import CTRNN
from lanczos_ntk.optim import LowRankNaturalGradient
from lanczos_ntk.testing import dense_gram


def _problem(seed=0):
    model = CTRNN(4, 2, gain=1.3, dt=0.2, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(3, 6, 2, generator=g, dtype=torch.float64)
    target = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    return model, u, target


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _loss_grad(model, u, target):
    model.zero_grad()
    loss = ((model(u) - target) ** 2).mean()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def _dense_step(model, u, grad, lr, rank, damping=None):
    """δθ = -η [(I - U Uᵀ) ∇L + U diag(λ₀/(Λ + λ₀)) Uᵀ ∇L] from eigh of the dense G."""
    G = dense_gram(model, u)
    lam, V = torch.linalg.eigh(G)
    lam, V = lam.flip(0), V.flip(1)
    U, Lam = V[:, :rank], lam[:rank]
    lam0 = float(lam[rank]) if damping is None else damping
    coef = U.T @ grad
    return -lr * (grad - U @ coef + U @ (lam0 / (Lam + lam0) * coef))


@pytest.mark.parametrize("damping", [None, 0.5])
def test_step_matches_dense_formula(damping):
    model, u, target = _problem()
    lr, rank = 0.3, 3
    grad = _loss_grad(model, u, target)
    expected = _dense_step(model, u, grad, lr, rank, damping)
    before = _flat(model)
    opt = LowRankNaturalGradient(
        model, u, lr=lr, rank=rank, damping=damping, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    opt.step()
    torch.testing.assert_close(_flat(model) - before, expected, rtol=1e-8, atol=1e-12)
    assert opt.num_refreshes == 1 and opt.num_matvecs > 0


def test_precondition_is_damped_inverse():
    """λ₀ (U Λ Uᵀ + λ₀ I)⁻¹ g, the closed form of the docstring, on the dense G."""
    model, u, target = _problem(1)
    grad = _loss_grad(model, u, target)
    opt = LowRankNaturalGradient(model, u, lr=1.0, rank=2, tol=1e-12)
    opt.refresh()
    U, lam, lam0 = opt.U.to(torch.float64), opt.eigenvalues, opt.lambda0
    M = U @ torch.diag(lam) @ U.T + lam0 * torch.eye(U.shape[0], dtype=torch.float64)
    torch.testing.assert_close(
        opt.precondition(grad), lam0 * torch.linalg.solve(M, grad), rtol=1e-9, atol=1e-12
    )


def test_refresh_schedule_and_sgd_limit():
    model, u, target = _problem(2)
    opt = LowRankNaturalGradient(model, u, lr=0.1, rank=2, refresh_every=2)
    for _ in range(5):
        _loss_grad(model, u, target)
        opt.step()
    assert opt.num_refreshes == 3  # steps 0, 2, 4
    # a huge damping makes the preconditioner the identity: plain SGD
    model2, _, _ = _problem(2)
    sgd_model, _, _ = _problem(2)
    grad = _loss_grad(model2, u, target)
    _loss_grad(sgd_model, u, target)
    LowRankNaturalGradient(model2, u, lr=0.1, rank=2, damping=1e12).step()
    torch.optim.SGD(sgd_model.parameters(), lr=0.1).step()
    torch.testing.assert_close(_flat(model2), _flat(sgd_model), rtol=0, atol=1e-10)
    assert grad.abs().max() > 0


def test_errors():
    model, u, _ = _problem()
    with pytest.raises(ValueError, match="learning rate"):
        LowRankNaturalGradient(model, u, lr=0.0)
    with pytest.raises(ValueError, match="rank"):
        LowRankNaturalGradient(model, u, lr=0.1, rank=0)
    with pytest.raises(RuntimeError, match="refresh"):
        LowRankNaturalGradient(model, u, lr=0.1).precondition(torch.zeros(1))


def test_tracked_refresh_is_accurate_and_falls_back():
    """Tracked Ritz pairs: each Ritz value lies within its residual of an eigenvalue of the dense
    G, and the update uses exactly those pairs; an unreachable track_tol forces Lanczos."""
    model, u, target = _problem(3)
    opt = LowRankNaturalGradient(
        model, u, lr=0.05, rank=2, refresh_every=1, tol=1e-10, generator=torch.Generator().manual_seed(0)
    )
    for _ in range(4):
        _loss_grad(model, u, target)
        opt.step()
    assert opt.num_refreshes == 4 and opt.num_solves == 1  # three tracked refreshes
    # state of the last refresh was taken at the parameters before the last step: redo it now
    opt.refresh()
    G = dense_gram(model, u)
    lam = torch.linalg.eigvalsh(G).flip(0)
    U, theta = opt.U.to(torch.float64), opt.eigenvalues
    resid = torch.linalg.vector_norm(G @ U - U * theta, dim=0)
    assert bool((resid <= 0.1 * theta[0]).all())
    for t, r in zip(theta, resid):
        assert float((lam - t).abs().min()) <= float(r) + 1e-9 * float(lam[0])
    torch.testing.assert_close(U.T @ U, torch.eye(2, dtype=torch.float64), atol=1e-10, rtol=0)

    strict = LowRankNaturalGradient(
        model,
        u,
        lr=0.05,
        rank=2,
        refresh_every=1,
        track_tol=1e-300,
        generator=torch.Generator().manual_seed(0),
    )
    for _ in range(3):
        _loss_grad(model, u, target)
        strict.step()
    assert strict.num_solves == strict.num_refreshes == 3


def test_default_randomness_leaves_the_global_generator_alone():
    model, u, target = _problem(4)
    state = torch.random.get_rng_state()
    opt = LowRankNaturalGradient(model, u, lr=0.1, rank=2, refresh_every=1)
    for _ in range(2):
        _loss_grad(model, u, target)
        opt.step()
    assert torch.equal(torch.random.get_rng_state(), state)
