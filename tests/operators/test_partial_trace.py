"""Partial traces of the sNTK over units or time against dense partial traces (float64)."""

import pytest
import torch

import lanczos_ntk as lnk
from lanczos_ntk import models
from lanczos_ntk.testing import dense_jacobian

F64 = torch.float64


def _dense_partial_traces(model, u):
    """From the dense Jacobian (jacrev): Σ_i K[(b,t,i),(b',t',i)] and Σ_t K[(b,t,i),(b',t,i')]."""
    B, T = u.shape[:2]
    J = dense_jacobian(model, u)
    K = (J @ J.T).reshape(B, T, -1, B, T, J.shape[0] // (B * T))
    n = K.shape[2]
    time = torch.einsum("btiBsi->btBs", K).reshape(B * T, B * T)
    units = torch.einsum("btiBtj->biBj", K).reshape(B * n, B * n)
    return time, units, torch.trace(J @ J.T)


@pytest.mark.parametrize("group", [1, 3, 64])
def test_partial_traces_match_dense(group):
    model = models.CTRNN(4, 2, gain=1.3, seed=1)
    u = 0.5 * torch.randn(3, 5, 2, dtype=F64, generator=torch.Generator().manual_seed(2))
    K = lnk.StateNTK(model, u)
    time, units, tr = _dense_partial_traces(model, u)
    for keep, ref in (("time", time), ("units", units)):
        op = lnk.partial_trace(K, keep, group=group)
        assert op.shape == ref.shape
        X = torch.randn(ref.shape[0], 3, dtype=F64, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(op.matmul(X), ref @ X, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(op @ X[:, 0], ref @ X[:, 0], rtol=1e-10, atol=1e-10)
        # a partial trace keeps the trace
        assert float(torch.trace(ref)) == pytest.approx(float(tr), rel=1e-12)


def test_temporal_and_spatial_ranks_against_dense_eigenvalues():
    model = models.DiscreteRNN(5, 1, gain=0.9, seed=0)
    u = torch.randn(2, 12, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    K = lnk.StateNTK(model, u)
    time, units, _ = _dense_partial_traces(model, u)
    for keep, ref in (("time", time), ("units", units)):
        lam = torch.linalg.eigvalsh(ref).clamp_min(0)
        pr = float(lam.sum() ** 2 / (lam**2).sum())
        r = lnk.effective_rank(
            lnk.partial_trace(K, keep),
            kind="participation",
            num_probes=20,
            num_steps=ref.shape[0],
            generator=torch.Generator().manual_seed(1),
        )
        # deflated SLQ: the top eigenvalues exactly, the rest estimated from probes
        assert abs(r.value - pr) <= 4 * r.standard_error + 1e-9 * pr, (keep, r, pr)
        assert r.standard_error <= 0.05 * pr
        top = lnk.eigsh(lnk.partial_trace(K, keep), k=2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(top.eigenvalues, lam.flip(0)[:2], rtol=1e-8, atol=0)


def test_bad_input():
    K = lnk.StateNTK(models.CTRNN(3, 1, seed=0), torch.zeros(1, 4, 1, dtype=F64))
    with pytest.raises(ValueError, match="keep"):
        lnk.partial_trace(K, "trials")
    with pytest.raises(TypeError, match="StateNTK"):
        lnk.partial_trace(torch.eye(3))
    with pytest.raises(ValueError, match="rows"):
        lnk.partial_trace(K).matmul(torch.zeros(5, 1, dtype=F64))
