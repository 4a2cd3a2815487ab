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

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def wide_range():
    """One eigenvalue 1e12 above 999 in [1e-3, 1]: a 1e12 dynamic range."""
    lam = torch.cat([torch.tensor([1e12], dtype=F64), torch.linspace(1e-3, 1, 999, dtype=F64)])
    return matrix_with_spectrum(lam, gen(1)), torch.sort(lam, descending=True).values


def test_wide_dynamic_range_matches_arpack_accuracy_and_says_where_it_cannot_reach_tol():
    A, lam = wide_range()
    r = lnk.eigsh(A, k=4, tol=1e-8, return_eigenvectors=True)
    err = ((r.eigenvalues - lam[:4]).abs() / lam[:4]).numpy()
    w = np.sort(sla.eigsh(A.numpy(), k=4, which="LA", tol=1e-8, return_eigenvectors=False,
                          v0=np.ones(1000)))[::-1]
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
    lam = torch.cat([torch.tensor([10.0, 9.0], dtype=F64), torch.full((6,), 8.0, dtype=F64),
                     torch.tensor([7.5], dtype=F64), torch.linspace(0, 5, 291, dtype=F64)])
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
    L = scipy.sparse.diags([np.full(199, -1.0), np.full(200, 2.0), np.full(199, -1.0)],
                           [-1, 0, 1], format="csr")
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
