"""Tests of lanczos_ntk.linalg against dense truths (float64, matrices with prescribed spectra)."""

import math
import warnings

import pytest
import torch

from lanczos_ntk.linalg import (
    NumericalWarning,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_quadrature,
    thick_restart_lanczos,
)
from lanczos_ntk.testing import matrix_with_spectrum
from tests.helpers import gen, with_spectrum

F64 = torch.float64


def spectra(n=120):
    g = gen(1)
    X = torch.randn(n, 2 * n, dtype=F64, generator=g)
    wishart = torch.linalg.eigh(X @ X.T / n).eigenvalues
    clustered = torch.cat(
        [
            1 + 1e-3 * torch.rand(n // 2, dtype=F64, generator=g),
            5 + 1e-3 * torch.arange(n - n // 2, dtype=F64),
        ]
    )
    outlier = torch.rand(n, dtype=F64, generator=g)
    outlier[0] = 1e6
    rankdef = torch.linspace(1, 10, n, dtype=F64)
    rankdef[: n // 3] = 0
    return {
        "diagonal": torch.linspace(-3, 7, n, dtype=F64),
        "wishart": wishart,
        "clustered": clustered,
        "outlier": outlier,
        "rank_deficient": rankdef,
    }


def mm(A):
    return lambda X: A @ X


def relerr(a, b):
    return float(((a - b).abs() / b.abs().clamp_min(1e-300)).max())


# -- Lanczos ----------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [1, 3])
def test_krylov_relation_and_orthogonality(b):
    A = with_spectrum(spectra()["wishart"])
    n = A.shape[0]
    dec = lanczos(mm(A), torch.randn(n, b, dtype=F64, generator=gen()), 12)
    Q, T = dec.basis, dec.T
    m = Q.shape[1]
    assert m == 12 * b
    E = torch.zeros(m, b, dtype=F64)
    E[-b:] = torch.eye(b, dtype=F64)
    scale = float(torch.linalg.matrix_norm(A, 2))
    assert float((A @ Q - Q @ T - dec.residual @ E.T).norm()) < 1e-12 * scale
    assert float((Q.T @ Q - torch.eye(m, dtype=F64)).abs().max()) < 1e-13
    torch.testing.assert_close(T, T.T)
    if b == 1:
        torch.testing.assert_close(
            T, torch.diag(dec.alpha) + torch.diag(dec.beta, 1) + torch.diag(dec.beta, -1)
        )
        assert math.isclose(dec.beta_last, float(dec.residual.norm()), rel_tol=1e-12)


@pytest.mark.parametrize("b", [1, 2])
def test_ritz_residual_bounds_are_the_true_residuals(b):
    A = with_spectrum(spectra()["clustered"])
    dec = lanczos(mm(A), torch.randn(120, b, dtype=F64, generator=gen()), 15)
    theta, Y, res = dec.ritz()
    true = torch.linalg.vector_norm(A @ Y - Y * theta, dim=0)
    torch.testing.assert_close(res, true, rtol=1e-6, atol=1e-12)
    if b == 1:
        S = torch.linalg.eigh(dec.T).eigenvectors
        torch.testing.assert_close(res, dec.beta_last * S[-1].abs(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", ["diagonal", "wishart", "clustered", "outlier"])
def test_full_depth_is_exact(name):
    lam = spectra(60)[name]
    A = with_spectrum(lam)
    dec = lanczos(mm(A), torch.ones(60, dtype=F64), 60)
    theta = torch.linalg.eigvalsh(dec.T)
    exact = torch.sort(lam).values
    assert float((theta - exact).abs().max()) < 1e-9 * float(exact.abs().max())


def test_breakdown_finds_repeated_and_zero_eigenvalues():
    lam = torch.tensor([0.0] * 10 + [2.0] * 5 + [3.0, 4.0, 5.0], dtype=F64)
    A = with_spectrum(lam)
    dec = lanczos(mm(A), torch.randn(18, dtype=F64, generator=gen()), 18)
    assert len(dec.breakdowns) >= 10
    assert torch.isfinite(dec.T).all() and torch.isfinite(dec.basis).all()
    torch.testing.assert_close(torch.linalg.eigvalsh(dec.T), lam, atol=1e-10, rtol=0)


def test_all_zero_operator_has_no_nans():
    dec = lanczos(
        lambda X: torch.zeros_like(X), torch.randn(30, dtype=F64, generator=gen()), 30, generator=gen(2)
    )
    assert torch.equal(dec.T, torch.zeros(30, 30, dtype=F64))
    assert float((dec.basis.T @ dec.basis - torch.eye(30, dtype=F64)).abs().max()) < 1e-12


def test_recurrence_runs_in_float64_for_a_float32_operator():
    A = with_spectrum(torch.linspace(1, 2, 40, dtype=F64))
    A32 = A.float()
    seen = []

    def matmul(X):
        seen.append(X.dtype)
        return A32 @ X

    dec = lanczos(matmul, torch.ones(40, dtype=torch.float32), 10)
    assert set(seen) == {torch.float32}
    assert dec.basis.dtype == F64 and dec.T.dtype == F64


# -- thick restart ----------------------------------------------------------------------------
CASES = [(name, "LA") for name in ("diagonal", "wishart", "clustered", "outlier", "rank_deficient")]
CASES += [(name, "SA") for name in ("diagonal", "wishart", "clustered", "rank_deficient")]


@pytest.mark.parametrize(("name", "which"), CASES)
def test_thick_restart_matches_eigh(name, which):
    lam = spectra()[name]
    if which == "SA" and name in ("diagonal", "clustered"):
        lam = lam - lam.min() + 0.5  # SA is for PSD operators
    A = with_spectrum(lam)
    n, k = A.shape[0], 5
    out = thick_restart_lanczos(
        mm(A), n, k, which=which, tol=1e-10, generator=gen(), ncv=30, return_eigenvectors=True, dense_max=0
    )
    assert out.status == "converged" and bool(out.converged.all())
    exact = torch.sort(lam, descending=True).values
    if which == "LA":
        ref = exact[:k]
    else:
        ref = torch.sort(lam[lam > 0]).values[:k].flip(0)
    assert relerr(out.eigenvalues, ref) <= 1e-8
    Y = out.eigenvectors
    assert float((Y.T @ Y - torch.eye(k, dtype=F64)).abs().max()) < 1e-8
    true_res = torch.linalg.vector_norm(A @ Y - Y * out.eigenvalues, dim=0)
    assert bool((true_res <= out.residuals + 1e-10 * float(exact.abs().max())).all())
    if which == "SA":  # a one-probe quadrature estimate: sd ≈ sqrt(2 d (n - d) / n)
        d = int((lam == 0).sum())
        assert abs(out.null_dim - d) <= 4 * math.sqrt(2 * d * (n - d) / n) + 0.5


def test_largest_magnitude_on_an_indefinite_spectrum():
    lam = torch.linspace(-9, 5, 120, dtype=F64)
    out = thick_restart_lanczos(mm(with_spectrum(lam)), 120, 3, which="LM", tol=1e-10, generator=gen())
    assert out.status == "converged"
    ref = lam[torch.argsort(lam.abs(), descending=True)[:3]]
    assert relerr(out.eigenvalues, torch.sort(ref, descending=True).values) < 1e-8


def test_repeated_eigenvalues_with_a_block():
    lam = torch.cat([torch.full((3,), 5.0, dtype=F64), torch.linspace(0, 4, 117, dtype=F64)])
    A = with_spectrum(lam)
    out = thick_restart_lanczos(mm(A), 120, 4, tol=1e-10, block_size=4, generator=gen())
    assert out.status == "converged"
    assert relerr(out.eigenvalues, torch.tensor([5.0, 5.0, 5.0, 4.0], dtype=F64)) < 1e-8
    assert out.num_matmuls * 4 == out.num_matvecs


@pytest.mark.parametrize("b", [1, 2, 4])
def test_block_sizes_agree(b):
    lam = spectra()["wishart"]
    A = with_spectrum(lam)
    out = thick_restart_lanczos(mm(A), 120, 6, tol=1e-10, block_size=b, generator=gen())
    assert out.status == "converged"
    assert relerr(out.eigenvalues, torch.sort(lam, descending=True).values[:6]) < 1e-8


def test_warm_start_saves_products():
    lam = spectra()["wishart"]
    A = with_spectrum(lam)
    cold = thick_restart_lanczos(mm(A), 120, 5, tol=1e-8, generator=gen(), return_eigenvectors=True)
    warm = thick_restart_lanczos(
        mm(A + 1e-6 * torch.eye(120, dtype=F64)), 120, 5, tol=1e-8, generator=gen(), v0=cold.eigenvectors
    )
    assert warm.status == "converged"
    assert warm.num_matvecs < cold.num_matvecs


@pytest.mark.parametrize("ncv", [14, 40])  # with thick restarts, and in one cycle
def test_kept_products_give_the_true_residuals_without_another_product(ncv, monkeypatch):
    import lanczos_ntk.linalg._restart as restart

    lam = 0.9 ** torch.arange(300, dtype=F64)
    A = with_spectrum(lam, seed=4)
    calls = []

    def mv(X):
        calls.append(X.shape[1])
        return A @ X

    k = 5
    kept = thick_restart_lanczos(mv, 300, k, tol=1e-10, ncv=ncv, generator=gen(2), return_eigenvectors=True)
    assert sum(calls) == kept.num_matvecs and kept.status == "converged"
    monkeypatch.setattr(restart, "KEEP_PRODUCTS_BYTES", 0)
    calls.clear()
    fresh = thick_restart_lanczos(mv, 300, k, tol=1e-10, ncv=ncv, generator=gen(2), return_eigenvectors=True)
    assert sum(calls) == fresh.num_matvecs == kept.num_matvecs + k
    assert kept.num_restarts == fresh.num_restarts and (ncv == 40) == (kept.num_restarts == 0), (
        kept.num_restarts
    )
    for out in (kept, fresh):
        Y = out.eigenvectors
        true = torch.linalg.vector_norm(A @ Y - Y * out.eigenvalues, dim=0)
        torch.testing.assert_close(out.residuals, true, rtol=1e-3, atol=1e-14)
        assert bool((true <= 1e-10 * out.eigenvalues).all())
        torch.testing.assert_close(out.eigenvalues, lam[:k], rtol=1e-13, atol=0)


def test_all_zero_operator():
    zero = lambda X: torch.zeros_like(X)  # noqa: E731
    la = thick_restart_lanczos(zero, 100, 4, generator=gen())
    assert la.status == "converged" and torch.equal(la.eigenvalues, torch.zeros(4, dtype=F64))
    for dense_max in (0, None):
        sa = thick_restart_lanczos(zero, 100, 4, which="SA", generator=gen(), dense_max=dense_max)
        assert sa.status == "converged" and sa.eigenvalues.numel() == 0 and sa.null_dim == 100


def test_max_restarts_is_a_status():
    A = with_spectrum(spectra()["clustered"])
    out = thick_restart_lanczos(mm(A), 120, 5, tol=1e-14, max_restarts=1, generator=gen())
    assert out.status == "max_iterations" and out.num_restarts == 1
    assert torch.isfinite(out.eigenvalues).all()


def test_nonfinite_operator_warns_and_fails():
    def bad(X):
        return torch.full_like(X, float("nan"))

    with pytest.warns(NumericalWarning, match="non-finite"):
        out = thick_restart_lanczos(bad, 100, 2, generator=gen())
    assert out.status == "failed"


def test_small_problems_are_solved_densely():
    lam = torch.linspace(1, 2, 20, dtype=F64)
    out = thick_restart_lanczos(mm(with_spectrum(lam)), 20, 3, tol=1e-12)
    assert out.num_matvecs == 20 and relerr(out.eigenvalues, lam.flip(0)[:3]) < 1e-12
    lam = torch.logspace(-9, 0, 200, dtype=F64)  # hopeless for Lanczos at the small end
    lam[:50] = 0
    out = thick_restart_lanczos(mm(with_spectrum(lam)), 200, 3, which="SA", tol=1e-12)
    assert out.num_matvecs == 200 and out.null_dim == 50
    assert relerr(out.eigenvalues, lam[50:53].flip(0)) < 1e-6


def test_bad_arguments():
    A = torch.eye(50, dtype=F64)
    with pytest.raises(ValueError, match="which"):
        thick_restart_lanczos(mm(A), 50, 2, which="XX")
    with pytest.raises(ValueError, match="k"):
        thick_restart_lanczos(mm(A), 50, 0)
    with pytest.raises(ValueError, match="ncv"):
        thick_restart_lanczos(mm(A), 50, 10, ncv=11)


# -- quadrature and traces --------------------------------------------------------------------
def wasserstein1(x, wx, y, wy):
    """W1 distance between two discrete measures on the line (weights normalised)."""
    pts = torch.cat([x, y])
    order = torch.argsort(pts)
    w = torch.cat([wx / wx.sum(), -wy / wy.sum()])[order]
    cdf = torch.cumsum(w, 0)[:-1]
    return float((cdf.abs() * torch.diff(pts[order])).sum())


def test_quadrature_is_exact_for_polynomials_on_a_diagonal():
    lam = torch.linspace(0.5, 3, 40, dtype=F64)
    A = torch.diag(lam)
    q = lanczos_quadrature(mm(A), 40, 3, 6, generator=gen())
    assert torch.allclose(q.weights.sum(1), torch.ones(3, dtype=F64))
    for p in range(12):  # exact up to degree 2m - 1 (Rademacher probes on a diagonal matrix)
        est = 40 * (q.weights * q.nodes**p).sum(1)
        torch.testing.assert_close(est, torch.full((3,), float((lam**p).sum()), dtype=F64), rtol=1e-9, atol=0)


def test_slq_measure_converges_in_wasserstein():
    lam = spectra(150)["wishart"]
    A = with_spectrum(lam)
    span = float(lam.max() - lam.min())
    dists = []
    for probes, steps in [(2, 4), (32, 30)]:
        q = lanczos_quadrature(mm(A), 150, probes, steps, generator=gen(3))
        d = wasserstein1(q.nodes.flatten(), q.weights.flatten(), lam, torch.ones_like(lam))
        dists.append(d / span)
    assert dists[1] < 0.02
    assert dists[1] < 0.5 * dists[0]


def test_quadrature_with_all_steps_recovers_a_wide_spectrum_without_ghosts():
    """``n`` steps on ``n`` distinct eigenvalues over six decades: with the basis kept
    orthogonal every probe's nodes are the spectrum; without reorthogonalisation copies
    ("ghosts") of the large eigenvalues crowd out small ones."""
    lam = torch.logspace(-3, 3, 60, dtype=F64)
    A = with_spectrum(lam)
    q = lanczos_quadrature(mm(A), 60, 3, 60, generator=gen(1))
    torch.testing.assert_close(
        q.nodes.sort(1).values, lam.expand(3, 60), rtol=0, atol=1e-12 * float(lam.max())
    )
    plain = lanczos_quadrature(mm(A), 60, 3, 60, generator=gen(1), reorthogonalize=False)
    assert float((plain.nodes.sort(1).values - lam).abs().max()) > 0.1 * float(lam.max())


def test_reorthogonalisation_makes_a_second_pass_where_the_first_is_not_enough():
    """A vector almost inside the basis (``1e-9`` of it outside): one classical Gram–Schmidt
    pass leaves it orthogonal only to about ``eps / 1e-9``; the second pass, which the norm
    test asks for, to working accuracy. A vector mostly outside needs one pass only."""
    from lanczos_ntk.linalg._slq import _project_out, _reorth

    n, p, j = 500, 3, 20
    basis = torch.linalg.qr(torch.randn(n, p * j, generator=gen(1), dtype=F64))[0]
    basis = basis.T.reshape(p, j, n).contiguous()  # each probe's own orthonormal [j, n] basis
    inside = torch.einsum("pjn,pj->np", basis, torch.randn(p, j, generator=gen(2), dtype=F64))
    W = inside + 1e-9 * torch.randn(n, p, generator=gen(3), dtype=F64)

    def leak(x):  # the largest component along the basis, relative to what is left
        coef = torch.einsum("pjn,np->pj", basis, x)
        return float((coef.abs().amax(1) / torch.linalg.vector_norm(x, dim=0)).max())

    once = W.clone()
    _project_out(once, basis)
    assert leak(once) > 1e-10  # one pass is not enough here
    _reorth(W, basis)
    assert leak(W) < 1e-13
    outside = torch.randn(n, p, generator=gen(4), dtype=F64)
    kept = outside.clone()
    _reorth(outside, basis)
    _project_out(kept, basis)
    torch.testing.assert_close(outside, kept, rtol=0, atol=0)  # no second pass was made


def test_quadrature_without_reorthogonalisation_still_estimates():
    lam = spectra(150)["wishart"]
    A = with_spectrum(lam)
    q = lanczos_quadrature(mm(A), 150, 16, 40, generator=gen(3), reorthogonalize=False)
    d = wasserstein1(q.nodes.flatten(), q.weights.flatten(), lam, torch.ones_like(lam))
    assert d / float(lam.max() - lam.min()) < 0.03
    est = 150 * (q.weights * q.nodes**2).sum(1)
    assert abs(float(est.mean()) - float((lam**2).sum())) < 4 * float(est.std()) / math.sqrt(16)


def test_quadrature_breakdown_has_no_nans():
    lam = torch.tensor([0.0] * 20 + [1.0, 2.0], dtype=F64)
    q = lanczos_quadrature(mm(with_spectrum(lam)), 22, 4, 10, generator=gen(), probe="gaussian")
    assert q.breakdowns > 0 and torch.isfinite(q.nodes).all() and torch.isfinite(q.weights).all()
    est = 22 * (q.weights * q.nodes).sum(1)
    v = torch.randn(22, 4, dtype=F64, generator=gen())  # same draws as the probes
    exact = (v * (with_spectrum(lam) @ v)).sum(0)
    torch.testing.assert_close(est, exact, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("fn", [hutchinson, hutchpp])
def test_trace_estimators_within_standard_error(fn):
    lam = spectra(100)["wishart"]
    A = with_spectrum(lam)
    exact = float(lam.sum())
    z = [
        abs(t.estimate - exact) / t.standard_error
        for t in (fn(mm(A), 100, 30, generator=gen(s)) for s in range(10))
    ]
    assert sum(x < 3 for x in z) >= 8 and max(z) < 6


def test_hutchpp_is_exact_on_low_rank():
    lam = torch.zeros(80, dtype=F64)
    lam[:5] = torch.tensor([9.0, 7.0, 5.0, 3.0, 1.0], dtype=F64)
    t = hutchpp(mm(with_spectrum(lam)), 80, 30, generator=gen())
    assert math.isclose(t.estimate, 25.0, rel_tol=1e-10) and t.standard_error < 1e-10


def test_no_warnings_on_regular_problems():
    A = with_spectrum(spectra()["wishart"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        thick_restart_lanczos(mm(A), 120, 3, generator=gen())
        lanczos_quadrature(mm(A), 120, 4, 20, generator=gen())


def test_matvec_that_returns_its_input_leaves_the_basis_intact():
    from lanczos_ntk.linalg import lanczos

    v0 = torch.randn(30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dec = lanczos(lambda X: X, v0, 5)  # the identity, returning the very tensor it was given
    Q = dec.basis
    assert torch.allclose(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(dec.alpha[:1], torch.ones(1, dtype=torch.float64))


def test_non_finite_operators_raise():
    import pytest

    import lanczos_ntk as lnk
    from lanczos_ntk.linalg import lanczos

    A = torch.eye(20, dtype=torch.float64)

    def bad(X):
        Y = A @ X
        Y[0] = float("nan")
        return Y

    with pytest.raises(ValueError, match="non-finite"):
        lanczos(bad, torch.ones(20, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="non-finite"):
        lnk.slq((bad, 20), num_probes=2, num_steps=4, generator=torch.Generator().manual_seed(0))


def test_matrix_with_spectrum_has_that_spectrum():
    lam = torch.tensor([3.0, -1.0, 0.0, 0.0, 7.5], dtype=F64)
    A = matrix_with_spectrum(lam, gen(3))
    assert torch.equal(A, A.T)
    torch.testing.assert_close(torch.linalg.eigvalsh(A), lam.sort().values, atol=1e-13, rtol=0)


def test_subspace_step_against_dense():
    """Ritz pairs and residuals of one step equal the dense Rayleigh–Ritz on the same basis;
    repeated steps converge to the dominant eigenpairs of a fixed matrix."""
    from lanczos_ntk.linalg import subspace_step

    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64)).Q
    lam = torch.cat([torch.tensor([10.0, 6.0, 3.0]), torch.linspace(1.0, 0.01, 37)]).double()
    A = Q @ torch.diag(lam) @ Q.T
    V = torch.linalg.qr(torch.randn(40, 5, generator=g, dtype=torch.float64)).Q
    step = subspace_step(lambda X: A @ X, V)
    H = V.T @ A @ V
    theta = torch.linalg.eigvalsh(H).flip(0)
    torch.testing.assert_close(step.eigenvalues, theta, rtol=1e-12, atol=1e-12)
    true_res = torch.linalg.norm(A @ step.eigenvectors - step.eigenvectors * step.eigenvalues, dim=0)
    torch.testing.assert_close(step.residuals, true_res, rtol=1e-10, atol=1e-12)
    for _ in range(40):
        step = subspace_step(lambda X: A @ X, step.basis)
    torch.testing.assert_close(step.eigenvalues[:3], lam[:3], rtol=1e-8, atol=0)


def test_a_run_stops_at_the_product_that_converged_it():
    """Convergence is tested after every step, not only at the end of a cycle (21 products
    here): three well-separated top eigenvalues converge well inside the first cycle."""
    lam = torch.cat([torch.tensor([100.0, 50.0, 25.0]), torch.linspace(0.0, 1.0, 197)]).double()
    A = with_spectrum(lam, seed=4)
    out = thick_restart_lanczos(
        lambda X: A @ X, 200, 3, tol=1e-10, generator=gen(5), return_eigenvectors=True
    )
    assert out.status == "converged" and out.ncv == 21 and out.num_matvecs < 21
    torch.testing.assert_close(out.eigenvalues, lam[:3], rtol=1e-12, atol=0)
    Y = out.eigenvectors
    true_res = torch.linalg.vector_norm(A @ Y - Y * out.eigenvalues, dim=0)
    assert bool((true_res <= 1e-10 * out.eigenvalues).all())


def test_copies_of_a_repeated_eigenvalue_are_found_after_the_krylov_space_closes():
    """After a breakdown (the Krylov space is invariant) the run goes on from a fresh direction,
    which is how further copies of a repeated top eigenvalue come in: no early stop there."""
    lam = torch.repeat_interleave(torch.arange(1.0, 9.0, dtype=torch.float64), 25)  # n = 200
    A = with_spectrum(lam, seed=4)
    out = thick_restart_lanczos(lambda X: A @ X, 200, 3, tol=1e-10, generator=gen(5))
    assert out.status == "converged"
    torch.testing.assert_close(out.eigenvalues, torch.full((3,), 8.0, dtype=torch.float64))
