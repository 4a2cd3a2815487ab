"""Tests of the public spectral front door (lanczos_ntk.spectral) against dense truths."""

import math

import numpy as np
import pytest
import torch

import lanczos_ntk as lnk
from lanczos_ntk import spectral
from lanczos_ntk._results import Status, load_result
from tests.helpers import gen, with_spectrum

F64 = torch.float64


def psd(n=100, rank=None, seed=0):
    lam = torch.rand(n, dtype=F64, generator=gen(seed + 10)) ** 2 * 4 + 0.1
    if rank is not None:
        lam[rank:] = 0
    return with_spectrum(lam, seed), lam


class FakeNTK:
    """``K = J Jᵀ`` (M × M) with ``.dual()`` giving ``G = Jᵀ J`` (P × P), like StateNTK."""

    def __init__(self, J):
        self.J = J
        self.shape = torch.Size([J.shape[0], J.shape[0]])
        self.dtype = J.dtype
        self.device = J.device
        self.calls = 0

    def matmul(self, X):
        self.calls += X.shape[1]
        return self.J @ (self.J.T @ X)

    def dual(self):
        return spectral.as_operator((lambda X: self.J.T @ (self.J @ X), self.J.shape[1]))


# -- coercion ---------------------------------------------------------------------------------
def test_coercions_agree():
    import scipy.sparse.linalg as sla
    from linear_operator.operators import DenseLinearOperator

    A, lam = psd(80)
    top = torch.sort(lam, descending=True).values[:3]
    forms = [
        A,
        A.numpy(),
        DenseLinearOperator(A),
        sla.aslinearoperator(A.numpy()),
        (lambda X: A @ X, 80),
        (lambda v: torch.mv(A, v), 80),  # vector-only: applied column by column
    ]
    for op in forms:
        r = lnk.eigsh(op, k=3, tol=1e-10)
        assert r.status == Status.CONVERGED, type(op)
        torch.testing.assert_close(r.eigenvalues, top, rtol=1e-9, atol=0)


def test_bad_operators_are_refused_clearly():
    with pytest.raises(ValueError, match="symmetric"):
        lnk.eigsh(torch.randn(30, 30, dtype=F64, generator=gen()), k=2)
    with pytest.raises(ValueError, match="square"):
        lnk.eigsh(torch.zeros(3, 4, dtype=F64), k=1)
    with pytest.raises(TypeError, match="expected a symmetric operator"):
        lnk.eigsh("not an operator", k=1)
    with pytest.raises(TypeError, match="tuple"):
        lnk.eigsh((lambda X: X, "n"), k=1)
    with pytest.warns(UserWarning, match="dense solve"):  # k > n: all n, as scipy does
        r = lnk.eigsh(torch.diag(torch.arange(1.0, 6.0, dtype=F64)), k=6)
    assert r.eigenvalues.tolist() == [5.0, 4.0, 3.0, 2.0, 1.0] and r.status == Status.CONVERGED
    with pytest.raises(ValueError, match="side='dual'"):
        lnk.eigsh(torch.eye(5, dtype=F64), k=1, side="dual")
    with pytest.raises(ValueError, match="v0"):
        lnk.eigsh(torch.eye(50, dtype=F64), k=1, v0=torch.ones(49, dtype=F64))
    with pytest.raises(TypeError, match="Generator"):
        lnk.slq(torch.eye(5, dtype=F64), generator=0)


# -- eigsh ------------------------------------------------------------------------------------
def test_eigsh_top_and_bottom_with_eigenvectors():
    A, lam = psd(150, rank=110)
    top = lnk.eigsh(A, k=5, tol=1e-10, return_eigenvectors=True, generator=gen())
    exact = torch.sort(lam, descending=True).values
    torch.testing.assert_close(top.eigenvalues, exact[:5], rtol=1e-8, atol=0)
    assert top.eigenvectors.shape == (150, 5) and top.side == "primal" and top.null_dim is None
    for dense_max in (0, None):  # Lanczos, then the dense path (the default for n <= 1024)
        bot = lnk.eigsh(A, k=4, which="SA", tol=1e-10, generator=gen(), dense_max=dense_max)
        torch.testing.assert_close(bot.eigenvalues, exact[106:110], rtol=1e-8, atol=0)
        assert abs(bot.null_dim - 40) <= 4 * math.sqrt(2 * 40 * 110 / 150)
        assert bool(bot.converged.all()) and bot.num_matvecs > 0
    assert bot.null_dim == 40


def test_eigsh_is_deterministic_for_a_generator():
    A, _ = psd(100)
    a = lnk.eigsh(A, k=3, generator=gen(5), return_eigenvectors=True)
    b = lnk.eigsh(A, k=3, generator=gen(5), return_eigenvectors=True)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)
    assert a.seed == 5 and a.num_matvecs == b.num_matvecs


def test_eigsh_block_variant_and_warm_start():
    A, lam = psd(120)
    exact = torch.sort(lam, descending=True).values[:4]
    r = lnk.eigsh(A, k=4, tol=1e-10, block_size=3, return_eigenvectors=True)
    torch.testing.assert_close(r.eigenvalues, exact, rtol=1e-8, atol=0)
    assert r.block_size == 3 and r.num_matmuls < r.num_matvecs
    warm = lnk.eigsh(A, k=4, tol=1e-10, v0=r.eigenvectors)
    assert warm.num_matvecs < r.num_matvecs


def test_no_convergence_is_a_status_or_an_exception():
    A, _ = psd(200)
    r = lnk.eigsh(A, k=3, tol=1e-15, max_restarts=1)
    assert r.status == Status.MAX_ITERATIONS and not bool(r.converged.all())
    with pytest.raises(lnk.NoConvergence, match="max_restarts") as info:
        lnk.eigsh(A, k=3, tol=1e-15, max_restarts=1, raise_on_failure=True)
    assert torch.equal(info.value.result.eigenvalues, r.eigenvalues)


def test_float32_operator():
    A, lam = psd(150)
    r = lnk.eigsh(A.float(), k=3, tol=1e-5)
    assert r.dtype == "float32" and r.status == Status.CONVERGED
    assert r.eigenvalues.dtype == F64
    torch.testing.assert_close(r.eigenvalues, torch.sort(lam, descending=True).values[:3], rtol=1e-5, atol=0)
    t = lnk.trace(A.float(), "hutch++", 30)
    assert abs(t.estimate - float(lam.sum())) < 5 * t.standard_error + 1e-4 * float(lam.sum())


def test_condition_number_of_the_nonzero_part():
    A, lam = psd(120, rank=90)
    c = lnk.condition_number(A, tol=1e-10)
    nz = lam[lam > 0]
    assert math.isclose(c.value, float(nz.max() / nz.min()), rel_tol=1e-7)
    assert c.status == Status.CONVERGED


# -- sides ------------------------------------------------------------------------------------
def test_auto_side_uses_the_smaller_dual():
    J = torch.randn(90, 30, dtype=F64, generator=gen())  # M = 90 > P = 30
    K = FakeNTK(J)
    lam = torch.linalg.eigvalsh(J.T @ J)
    r = lnk.eigsh(K, k=3, tol=1e-10)
    assert r.side == "dual" and r.dimension == 30 and r.primal_dimension == 90 and K.calls == 0
    torch.testing.assert_close(r.eigenvalues, lam.flip(0)[:3], rtol=1e-9, atol=0)
    sa = lnk.eigsh(K, k=2, which="SA", tol=1e-10, dense_max=0)
    assert sa.null_dim == 60
    torch.testing.assert_close(sa.eigenvalues, lam[:2].flip(0), rtol=1e-8, atol=0)
    p = lnk.eigsh(K, k=3, tol=1e-10, return_eigenvectors=True)  # eigenvectors: K's own space
    assert p.side == "primal" and K.calls > 0 and p.eigenvectors.shape == (90, 3)
    torch.testing.assert_close(p.eigenvalues, r.eigenvalues, rtol=1e-9, atol=0)
    t_dual = lnk.trace(K, "exact")
    assert t_dual.side == "dual" and math.isclose(t_dual.estimate, float(lam.sum()), rel_tol=1e-12)
    s = lnk.slq(K, 8, 30)
    d = lnk.spectral_density(s)
    assert s.side == "dual" and s.extra_zeros == 60
    assert math.isclose(d.zero_mass, 60 / 90, rel_tol=1e-9)
    sp = lnk.slq(K, 8, 40, side="primal")
    for kind in ("participation", "entropy"):
        a = lnk.effective_rank(s, kind)
        b = lnk.effective_rank(sp, kind)
        assert abs(a.value - b.value) < 4 * math.hypot(a.standard_error, b.standard_error) + 1e-9


# -- SLQ and what follows -------------------------------------------------------------------
def test_slq_density_and_zero_mass():
    A, lam = psd(120, rank=80)
    r = lnk.slq(A, 16, 40, generator=gen())
    assert r.nodes.shape == (16, 40) and r.num_matvecs == 16 * 40
    d = lnk.spectral_density(r, num_points=400)
    mass = float(torch.trapezoid(d.density, d.grid))
    assert abs(d.zero_mass - 40 / 120) < 0.05
    assert abs(mass + d.zero_mass - 1) < 1e-3
    dl = lnk.spectral_density(r, scale="log")
    assert dl.scale == "log" and torch.isfinite(dl.density).all()


def test_trace_and_tr_f_within_standard_errors():
    A, lam = psd(100)
    truths = {"tr": float(lam.sum()), "tr2": float((lam**2).sum())}
    hits = 0
    for seed in range(8):
        r = lnk.slq(A, 16, 20, generator=gen(seed))
        for key, f in (("tr", lambda x: x), ("tr2", lambda x: x * x)):
            t = lnk.tr_f(r, f)
            hits += abs(t.estimate - truths[key]) < 3 * t.standard_error
    assert hits >= 13
    for method in ("hutchinson", "hutch++"):
        z = [
            abs(t.estimate - truths["tr"]) / t.standard_error
            for t in (lnk.trace(A, method, 30, generator=gen(s)) for s in range(8))
        ]
        assert sum(x < 3 for x in z) >= 6, (method, z)
    assert lnk.trace(A, "exact").estimate == pytest.approx(truths["tr"], rel=1e-12)
    ex = lnk.trace((lambda X: A @ X, 100), "exact")
    assert ex.num_matvecs == 100 and ex.estimate == pytest.approx(truths["tr"], rel=1e-12)


@pytest.mark.parametrize("kind", ["participation", "entropy", "stable", "numerical"])
def test_effective_ranks_within_standard_errors(kind):
    A, lam = psd(100, rank=70)
    p = lam / lam.sum()
    pnz = p[p > 0]
    truth = {
        "participation": float(lam.sum() ** 2 / (lam**2).sum()),
        "entropy": float(torch.exp(-(pnz * pnz.log()).sum())),
        "stable": float(lam.sum() / lam.max()),
        "numerical": 70.0,
    }[kind]
    hits = 0
    for seed in range(6):
        r = lnk.effective_rank(A, kind, num_probes=16, num_steps=30, generator=gen(seed))
        assert r.kind == kind and r.num_matvecs > 0
        hits += abs(r.value - truth) < 4 * r.standard_error + 1e-6 * truth
    assert hits >= 5


def test_slq_is_deterministic_and_validates():
    A, _ = psd(60)
    a = lnk.slq(A, 4, 10, generator=gen(1))
    b = lnk.slq(A, 4, 10, generator=gen(1))
    assert torch.equal(a.nodes, b.nodes) and torch.equal(a.weights, b.weights)
    with pytest.raises(ValueError, match="probe"):
        lnk.slq(A, probe="sphere")
    with pytest.raises(TypeError, match="SLQResult"):
        lnk.spectral_density(A)


def test_all_zero_operator_everywhere():
    Z = torch.zeros(50, 50, dtype=F64)
    r = lnk.slq(Z, 4, 10)
    assert torch.isfinite(r.nodes).all() and torch.isfinite(r.weights).all()
    assert lnk.spectral_density(r).zero_mass == pytest.approx(1.0)
    assert lnk.effective_rank(r, "participation").value == 0.0
    e = lnk.eigsh(Z, k=2, which="SA")
    assert e.eigenvalues.numel() == 0 and e.null_dim == 50


# -- results ----------------------------------------------------------------------------------
def test_results_round_trip(tmp_path):
    A, _ = psd(60, rank=40)
    r = lnk.slq(A, 4, 10)
    results = [
        lnk.eigsh(A, k=2, return_eigenvectors=True),
        lnk.eigsh(A, k=2, which="SA"),
        r,
        lnk.spectral_density(r),
        lnk.trace(A),
        lnk.effective_rank(r, "entropy"),
        lnk.condition_number(A),
    ]
    for i, res in enumerate(results):
        path = res.save(tmp_path / f"r{i}")
        back = load_result(path)
        assert type(back) is type(res)
        for key, value in res.to_dict().items():
            other = back.to_dict()[key]
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(other)
            else:
                assert other == value, key
    assert isinstance(np.asarray(results[0].to_dict()["eigenvalues"]), np.ndarray)


# -- the sNTK of a small CTRNN ------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_ntk():
    model = lnk.models.CTRNN(6, 2, seed=0).double()
    u = torch.randn(3, 5, 2, dtype=F64, generator=gen(7))
    K = lnk.StateNTK(model, u)
    dense = lnk.testing.dense_ntk(model, u)
    return K, dense


def test_sntk_top_and_bottom_against_dense(small_ntk):
    K, dense = small_ntk
    M, P = K.shape[0], K.dual().shape[0]
    lam = torch.linalg.eigvalsh(dense).flip(0)  # descending
    top = lnk.eigsh(K, k=4, tol=1e-10, ncv=16)  # ncv < n: the Lanczos path
    assert top.side == ("dual" if P < M else "primal") and top.num_matvecs < 54
    torch.testing.assert_close(top.eigenvalues, lam[:4], rtol=1e-8, atol=0)
    rank = int((lam > 1e-10 * lam[0]).sum())
    bot = lnk.eigsh(K, k=2, which="SA", tol=1e-10)
    torch.testing.assert_close(bot.eigenvalues, lam[rank - 2 : rank], rtol=1e-6, atol=0)
    assert bot.null_dim == M - rank
    prim = lnk.eigsh(K, k=4, tol=1e-10, side="primal", ncv=20, block_size=2)
    assert prim.side == "primal" and prim.dimension == M
    torch.testing.assert_close(prim.eigenvalues, lam[:4], rtol=1e-8, atol=0)


def test_tampered_results_are_refused_naming_the_file(tmp_path):
    from lanczos_ntk._results import ResultFileError

    r = lnk.eigsh(torch.diag(torch.arange(1.0, 31.0, dtype=F64)), k=3)
    a, b = r.save(tmp_path / "a"), lnk.eigsh(torch.eye(40, dtype=F64), k=1).save(tmp_path / "b")
    text = a.read_text()
    cases = {
        "truncated": lambda: a.write_text(text[:50]),
        "a list": lambda: a.write_text("[1, 2]"),
        "wrong fields": lambda: a.write_text(text.replace('"eigenvalues"', '"eigen_values"')),
    }
    for spoil in cases.values():
        spoil()
        with pytest.raises(ResultFileError, match="a.json"):
            load_result(tmp_path / "a")
        a.write_text(text)
    npz = tmp_path / "a.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])  # truncated arrays
    with pytest.raises(ResultFileError, match="a.npz"):
        load_result(tmp_path / "a")
    npz.write_bytes((tmp_path / "b.npz").read_bytes())  # another result's arrays
    with pytest.raises(ResultFileError, match="SHA-256"):
        load_result(tmp_path / "a")
    npz.write_bytes(good)
    torch.testing.assert_close(load_result(tmp_path / "a").eigenvalues, r.eigenvalues)
    assert b.exists()


def test_linear_density_is_reflected_at_zero():
    """A PSD spectrum smoothed on the linear scale puts no mass below 0. Reference: a diagonal
    matrix, whose Gauss quadrature from a Rademacher probe is exact (nodes λ_i, weights 1/n),
    so the density is the closed form (1/n) Σ_i [N(x; λ_i, σ²) + N(-x; λ_i, σ²)] for x >= 0."""
    lam = torch.linspace(0.01, 1.0, 30, dtype=torch.float64)
    r = lnk.slq(torch.diag(lam), 2, 30, generator=gen())
    sigma = 0.2
    d = lnk.spectral_density(r, sigma=sigma, num_points=2001)
    assert float(d.grid.min()) >= 0.0 and d.zero_mass == 0.0

    def phi(z):
        return torch.exp(-0.5 * (z / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))

    want = (phi(d.grid[:, None] - lam) + phi(d.grid[:, None] + lam)).mean(dim=1)
    torch.testing.assert_close(d.density, want, rtol=1e-8, atol=1e-10)
    assert abs(float(torch.trapezoid(d.density, d.grid)) - 1.0) < 1e-4  # no mass lost
    on = lnk.spectral_density(r, grid=torch.tensor([-0.3, -1e-3, 0.0, 0.5], dtype=torch.float64), sigma=sigma)
    assert on.density[:2].tolist() == [0.0, 0.0] and bool((on.density[2:] > 0).all())


def test_results_are_saved_under_their_public_path_and_old_paths_still_load(tmp_path):
    """Saved results name ``lanczos_ntk.spectral:<Class>`` whatever file defines the class, and
    files written when ``DeflatedSLQ`` lived in ``lanczos_ntk._deflated`` still load."""
    import json

    A = torch.diag(torch.linspace(0.1, 4.0, 30, dtype=torch.float64))
    top = lnk.eigsh(A, k=2)
    quad = lnk.deflated_slq(A, num_probes=4, num_steps=10, k=2)
    for name, res, cls in (("top", top, "EigshResult"), ("quad", quad, "DeflatedSLQ")):
        res.save(tmp_path / name)
        meta = json.loads((tmp_path / f"{name}.json").read_text())
        assert meta["type"] == f"lanczos_ntk.spectral:{cls}"
    meta = json.loads((tmp_path / "quad.json").read_text())
    meta["type"] = "lanczos_ntk._deflated:DeflatedSLQ"  # as written before the move
    (tmp_path / "quad.json").write_text(json.dumps(meta))
    again = lnk.load_result(tmp_path / "quad")
    assert isinstance(again, lnk.DeflatedSLQ) and torch.equal(again.top, quad.top)
