"""Honest answers: convergence flags that mean the requested tolerance, repeated eigenvalues
found, wrong questions refused. Each case is checked against an independent truth (the
prescribed spectrum, scipy's ARPACK on the same matrix)."""

import numpy as np
import pytest
import scipy.sparse
import scipy.sparse.linalg as sla
import torch

import lanczos_ntk as lnk
from lanczos_ntk._results import Status
from lanczos_ntk.testing import matrix_with_spectrum
from tests.helpers import gen

F64 = torch.float64


def wide_range():
    """One eigenvalue 1e12 above 999 in [1e-3, 1]: a 1e12 dynamic range."""
    lam = torch.cat([torch.tensor([1e12], dtype=F64), torch.linspace(1e-3, 1, 999, dtype=F64)])
    return matrix_with_spectrum(lam, gen(1)), torch.sort(lam, descending=True).values


def test_wide_dynamic_range_matches_arpack_accuracy_and_says_where_it_cannot_reach_tol():
    A, lam = wide_range()
    r = lnk.eigsh(A, k=4, tol=1e-8, return_eigenvectors=True)
    err = ((r.eigenvalues - lam[:4]).abs() / lam[:4]).numpy()
    w = np.sort(sla.eigsh(A.numpy(), k=4, which="LA", tol=1e-8, return_eigenvectors=False, v0=np.ones(1000)))[
        ::-1
    ]
    arpack = np.abs(w - lam[:4].numpy()) / lam[:4].numpy()
    # as accurate as ARPACK at the same tol (within a factor that covers the random start)
    assert err.max() <= 10 * max(arpack.max(), 1e-12), (err, arpack)
    # products of a dense matrix with norm 1e12 carry errors ~1e-4: residuals of the pairs near
    # 1 cannot reach 1e-8, and the result says so instead of calling them converged
    Y = r.eigenvectors
    true_res = torch.linalg.vector_norm(A @ Y - Y * r.eigenvalues, dim=0)
    torch.testing.assert_close(r.residuals, true_res, rtol=0.5, atol=1e-9)
    assert r.status == Status.ACCURACY_LIMITED
    assert bool(r.converged[0]) and not bool(r.converged[1:].any())
    assert bool((r.converged == (r.residuals <= 1e-8 * r.eigenvalues.abs())).all())


def test_converged_pairs_meet_the_requested_tolerance():
    lam = torch.linspace(0.01, 1, 400, dtype=F64) ** 3
    A = matrix_with_spectrum(lam, gen(2))
    for tol in (1e-4, 1e-8):
        r = lnk.eigsh(A, k=6, tol=tol, return_eigenvectors=True)
        res = torch.linalg.vector_norm(A @ r.eigenvectors - r.eigenvectors * r.eigenvalues, dim=0)
        assert r.status == Status.CONVERGED
        assert bool((res <= tol * r.eigenvalues.abs() * 1.001).all())


def test_float32_products_report_the_rounding_floor():
    lam = torch.cat([torch.tensor([1e4], dtype=F64), torch.linspace(1e-3, 1, 599, dtype=F64)])
    A = matrix_with_spectrum(lam, gen(3)).float()
    r = lnk.eigsh(A, k=3, tol=1e-8)
    # eps32 ||A|| ~ 1e-3 against targets 1e-8 |θ|: only the top pair can be resolved
    assert r.status == Status.ACCURACY_LIMITED and not bool(r.converged.all())
    torch.testing.assert_close(r.eigenvalues[0], torch.tensor(1e4, dtype=F64), rtol=1e-6, atol=0)


def test_missed_copies_of_a_repeated_eigenvalue_are_found():
    lam = torch.cat(
        [
            torch.tensor([10.0, 9.0], dtype=F64),
            torch.full((6,), 8.0, dtype=F64),
            torch.tensor([7.5], dtype=F64),
            torch.linspace(0, 5, 291, dtype=F64),
        ]
    )
    A = matrix_with_spectrum(lam, gen(4))
    truth = torch.sort(lam, descending=True).values[:9]
    r = lnk.eigsh(A, k=9)
    torch.testing.assert_close(r.eigenvalues, truth, rtol=1e-9, atol=0)
    assert r.status == Status.CONVERGED and r.missed_copies >= 1
    plain = lnk.eigsh(A, k=9, verify=False)  # single-vector Lanczos alone skips copies
    assert (plain.eigenvalues - 8.0).abs().lt(1e-6).sum() < 6
    assert plain.num_matvecs < r.num_matvecs


def test_non_symmetric_callables_and_scipy_operators_are_refused():
    B = torch.randn(60, 60, dtype=F64, generator=gen(5))
    with pytest.raises(ValueError, match="symmetric"):
        lnk.eigsh((lambda X: B @ X, 60), k=2)
    op = sla.aslinearoperator(B.numpy())
    with pytest.raises(ValueError, match="symmetric"):
        lnk.eigsh(op, k=2)
    with pytest.raises(ValueError, match="symmetric"):
        lnk.slq(op, 4, 5)
    S = B + B.T  # symmetric ones pass, also in float32 arithmetic
    lnk.eigsh((lambda X: (S.float() @ X.float()).double(), 60), k=2)
    lnk.eigsh(sla.aslinearoperator(S.numpy()), k=2)


def test_scipy_sparse_matrices_are_accepted_and_checked():
    L = scipy.sparse.diags(
        [np.full(199, -1.0), np.full(200, 2.0), np.full(199, -1.0)], [-1, 0, 1], format="csr"
    )
    truth = 2 - 2 * np.cos(np.arange(1, 201) * np.pi / 201)
    for M in (L, scipy.sparse.csr_array(L)):
        r = lnk.eigsh(M, k=3, tol=1e-10)
        np.testing.assert_allclose(r.eigenvalues.numpy(), np.sort(truth)[::-1][:3], rtol=1e-9)
    with pytest.raises(ValueError, match="symmetric"):
        lnk.eigsh(scipy.sparse.triu(L, format="csr"), k=2)


def test_smallest_eigenvalues_refuse_an_operator_that_is_not_psd():
    lam = -torch.linspace(1, 2, 50, dtype=F64)
    with pytest.raises(ValueError, match="positive semi-definite"):
        lnk.eigsh(matrix_with_spectrum(lam, gen(6)), k=3, which="SA")
    lam = torch.cat([torch.tensor([-0.5], dtype=F64), torch.linspace(1, 2, 399, dtype=F64)])
    A = matrix_with_spectrum(lam, gen(7))
    with pytest.raises(ValueError, match="positive semi-definite"):
        lnk.eigsh(A, k=2, which="SA", dense_max=0)


def test_k_above_the_dimension_is_a_dense_solve():
    lam = torch.linspace(1, 7, 7, dtype=F64)
    with pytest.warns(UserWarning, match="dense solve"):
        r = lnk.eigsh(matrix_with_spectrum(lam, gen(8)), k=10)
    torch.testing.assert_close(r.eigenvalues, lam.flip(0), rtol=1e-12, atol=1e-12)


# -- deflated estimates: the truth inside ±2 s.e. over many seeds --------------------------------
def _truth(lam):
    lam = lam.clamp_min(0)
    p = lam / lam.sum()
    p = p[p > 0]
    return {
        "participation": float(lam.sum() ** 2 / (lam**2).sum()),
        "entropy": float(torch.exp(-(p * p.log()).sum())),
        "trace": float(lam.sum()),
    }


def _coverage(op, lam, seeds, **kw):
    truth = _truth(lam)
    hits = dict.fromkeys(truth, 0)
    for seed in range(seeds):
        r = lnk.deflated_slq(op, generator=gen(100 + seed), **kw)
        est = {kind: lnk.effective_rank(r, kind) for kind in ("participation", "entropy")}
        est["trace"] = lnk.trace_from_slq(r)
        for name, e in est.items():
            value = e.estimate if name == "trace" else e.value
            hits[name] += abs(value - truth[name]) <= 2 * e.standard_error
    return hits


def collapsed(seed=0):
    """Participation ratio 1.0001: one eigenvalue 1, 399 summing to 5e-5."""
    g = gen(seed)
    rest = torch.rand(399, dtype=F64, generator=g)
    lam = torch.cat([torch.ones(1, dtype=F64), rest / rest.sum() * 5e-5])
    return matrix_with_spectrum(lam, g), lam


@pytest.mark.parametrize("case", ["collapsed", "bulk", "flat"])
def test_deflated_estimates_cover_the_truth_on_prescribed_spectra(case):
    g = gen(11)
    if case == "collapsed":
        A, lam = collapsed()
    elif case == "bulk":
        lam = torch.cat(
            [torch.tensor([1.0, 0.2], dtype=F64), 0.01 * torch.rand(298, dtype=F64, generator=g) ** 3]
        )
        A = matrix_with_spectrum(lam, g)
    else:
        lam = torch.rand(300, dtype=F64, generator=g)
        A = matrix_with_spectrum(lam, g)
    seeds = 30
    hits = _coverage(A, lam, seeds, num_probes=12, num_steps=30)
    assert min(hits.values()) >= 0.9 * seeds, hits


def test_plain_slq_is_what_deflation_fixes_on_a_collapsed_kernel():
    # many probes see the top eigenvalue through a random weight: the spread of the plain
    # participation estimate over seeds is far wider than the deflated one's
    A, lam = collapsed()
    truth = _truth(lam)["participation"]
    plain = [lnk.effective_rank(lnk.slq(A, 10, 30, generator=gen(s))).value for s in range(10)]
    defl = [lnk.effective_rank(lnk.deflated_slq(A, 10, 30, generator=gen(s))).value for s in range(10)]
    assert max(abs(v - truth) for v in defl) < 1e-4
    assert max(abs(v - truth) for v in plain) > 100 * max(abs(v - truth) for v in defl)
    assert min(defl) >= 1.0  # clamped to the valid range


def test_deflated_estimates_cover_the_truth_on_an_sntk_near_its_bifurcation():
    from lanczos_ntk.experiments.sweep import critical_gain, model_at
    from lanczos_ntk.models import CTRNN
    from lanczos_ntk.testing import dense_gram

    base = CTRNN(10, 1, gain=1.0, dt=0.1, seed=3).double()
    model = model_at(base, "gain", 1.05 * critical_gain(base))
    u = 0.01 * torch.randn(2, 60, 1, dtype=F64, generator=gen(0))
    G = dense_gram(model, u)
    lam = torch.linalg.eigvalsh(0.5 * (G + G.T))
    assert _truth(lam)["participation"] < 2.0  # collapsed onto the bifurcation channel
    K = lnk.StateNTK(model, u)
    seeds = 20
    hits = _coverage(K, lam, seeds, num_probes=8, num_steps=30)
    assert min(hits.values()) >= 0.9 * seeds, hits


def test_too_few_lanczos_steps_is_a_status():
    lam = torch.linspace(0.01, 1, 200, dtype=F64) ** 4
    A = matrix_with_spectrum(lam, gen(12))
    one = lnk.slq(A, 10, 1)
    pr = lnk.effective_rank(one, "participation")
    assert pr.status == Status.TOO_FEW_STEPS and pr.standard_error == float("inf")
    assert lnk.trace_from_slq(one).status == Status.CONVERGED  # degree 1: exact with one step
    enough = lnk.effective_rank(lnk.slq(A, 10, 40), "entropy")
    assert enough.status == Status.CONVERGED and enough.quadrature_error < 0.01 * enough.value


def test_deflated_density_carries_the_top_exactly_and_round_trips(tmp_path):
    A, lam = collapsed()
    r = lnk.deflated_slq(A, 8, 20)
    assert r.k >= 1 and abs(r.lambda_max - 1.0) < 1e-10 and r.remainder_share < 0.05
    d = lnk.spectral_density(r, scale="log", zero_rtol=1e-12)
    # the top eigenvalue carries 1/N of the mass, as one eigenvalue of N should
    near = d.grid > -0.5
    mass = float(torch.trapezoid(d.density[near], d.grid[near]))
    assert abs(mass - 1 / 400) < 2e-4
    r.save(tmp_path / "r")
    back = lnk.load_result(tmp_path / "r")
    assert lnk.effective_rank(back).value == lnk.effective_rank(r).value
    with pytest.raises(ValueError, match="eigenpairs"):
        lnk.deflated_slq(A, eigenpairs=lnk.eigsh(A, k=2))


def test_zero_mass_states_a_bound_that_covers_the_truth():
    # a gated model: its spectrum runs through the 1e-6 λ_max cut, which the quadrature
    # cannot resolve; the Chebyshev–Markov–Stieltjes bound says how far off the count can be
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 10, batch_first=True).double()
    u = torch.randn(6, 20, 3, dtype=F64, generator=gen(0))
    K = lnk.StateNTK(lstm, u)
    d = lnk.spectral_density(lnk.deflated_slq(K, 10, 40))
    from lanczos_ntk.testing import dense_operator

    lam = torch.linalg.eigvalsh(dense_operator(K.dual(), block=200))
    true = (int((lam <= 1e-6 * lam.max()).sum()) + K.shape[0] - lam.numel()) / K.shape[0]
    assert abs(d.zero_mass - true) <= d.zero_mass_bound
    assert d.zero_mass_bound < 0.5
