"""Classical systems of the continuation literature with published bifurcation values."""

import math

import pytest
import torch
from scipy.optimize import brentq

from lanczos_ntk import Status
from lanczos_ntk.dynamics import System, continuation

F64 = torch.float64


def _t(*v):
    return torch.tensor(v, dtype=F64)


def test_brusselator_hopf_at_one_plus_a_squared():
    """Brusselator ``ẋ = A - (B+1)x + x²y, ẏ = Bx - x²y``: fixed point ``(A, B/A)``, trace
    ``B - 1 - A²``, determinant ``A²``: Hopf at ``B = 1 + A²`` with ``ω = A`` (Prigogine & Lefever
    1968); supercritical (``l₁ < 0``)."""
    A = 1.5

    def f(x, B):
        return torch.stack([A - (B + 1) * x[0] + x[0] ** 2 * x[1], B * x[0] - x[0] ** 2 * x[1]])

    br = continuation(f, _t(A, 1.0 / A), 1.0, (1.0, 4.5), kind="flow")
    assert [b.kind for b in br.bifurcations] == ["hopf"]
    b = br.bifurcations[0]
    assert b.p == pytest.approx(1 + A**2, abs=1e-10)
    assert b.coefficients["omega"] == pytest.approx(A, abs=1e-9)
    assert b.coefficients["l1"] < 0
    torch.testing.assert_close(b.x, _t(A, (1 + A**2) / A))


def test_lorenz_hopf_and_pitchfork():
    """Lorenz (σ=10, β=8/3): ``C±`` lose stability at ``ρ_H = σ(σ+β+3)/(σ-β-1) = 470/19 ≈ 24.7368``
    through a subcritical Hopf (``l₁ > 0``) with ``ω² = β(ρ_H + σ)``; the origin has a pitchfork at
    ``ρ = 1`` (Lorenz 1963; Sparrow 1982)."""
    s, beta = 10.0, 8.0 / 3.0

    def f(x, rho):
        return torch.stack([s * (x[1] - x[0]), rho * x[0] - x[1] - x[0] * x[2], x[0] * x[1] - beta * x[2]])

    rho0 = 10.0
    c = math.sqrt(beta * (rho0 - 1))
    br = continuation(f, _t(c, c, rho0 - 1), rho0, (rho0, 30.0))
    assert [b.kind for b in br.bifurcations] == ["hopf"]
    b = br.bifurcations[0]
    rho_h = s * (s + beta + 3) / (s - beta - 1)
    assert rho_h == pytest.approx(24.7368, abs=1e-4)
    assert b.p == pytest.approx(rho_h, rel=1e-10)
    assert b.coefficients["omega"] == pytest.approx(math.sqrt(beta * (rho_h + s)), rel=1e-9)
    assert b.coefficients["l1"] > 0
    br = continuation(f, _t(0, 0, 0), 0.5, (0.5, 2.0))
    assert [b.kind for b in br.bifurcations] == ["branch_point"]
    assert br.bifurcations[0].p == pytest.approx(1.0, abs=1e-10)


def test_logistic_map_flip_and_transcritical():
    """``x ↦ r x (1 - x)``: ``x* = 1 - 1/r`` has multiplier ``2 - r``: period doubling at ``r = 3``
    and the transcritical crossing with ``x = 0`` at ``r = 1`` (May 1976). At ``r = 3``,
    ``x* = 2/3``, ``B(v,v) = -2r``, ``(1 - A)⁻¹ = ½``: ``c = ⅙·3·(-6)(½)(-6) = 9 > 0``
    (supercritical: a stable 2-cycle is born)."""
    logistic = System(lambda x, r: r * x * (1 - x), 1, "map")
    br = continuation(logistic, _t(0.5), 2.0, (0.5, 3.5))
    assert [b.kind for b in br.bifurcations] == ["flip"]
    b = br.bifurcations[0]
    assert b.p == pytest.approx(3.0, abs=1e-10)
    assert b.coefficients["c"] == pytest.approx(9.0, abs=1e-7)
    assert b.eigenvalue == pytest.approx(-1.0, abs=1e-9)
    br = continuation(logistic, _t(0.5), 2.0, (0.5, 3.5), direction=-1)
    assert [b.kind for b in br.bifurcations] == ["branch_point"]
    assert br.bifurcations[0].p == pytest.approx(1.0, abs=1e-10)
    assert abs(float(br.bifurcations[0].x[0])) < 1e-9


def test_henon_map_flip():
    """Hénon ``(x, y) ↦ (1 - a x² + y, b x)``: the fixed point ``x = [-(1-b) + √((1-b)² + 4a)]/(2a)``
    has a flip at ``a = 3(1 - b)²/4`` (Hénon 1976); ``= 0.3675`` for ``b = 0.3``."""
    bb = 0.3

    def f(z, a):
        return torch.stack([1 - a * z[0] ** 2 + z[1], bb * z[0]])

    a0 = 0.2
    x0 = (-(1 - bb) + math.sqrt((1 - bb) ** 2 + 4 * a0)) / (2 * a0)
    br = continuation(f, _t(x0, bb * x0), a0, (a0, 0.6), kind="map")
    assert [b.kind for b in br.bifurcations] == ["flip"]
    assert br.bifurcations[0].p == pytest.approx(3 * (1 - bb) ** 2 / 4, abs=1e-10)


def test_delayed_logistic_neimark_sacker():
    """Delayed logistic map ``(x, y) ↦ (r x (1 - y), x)`` (Maynard Smith 1968): ``x* = y* = 1 - 1/r``,
    Jacobian ``[[1, 1 - r], [1, 0]]``, multipliers of modulus ``√(r - 1)``: Neimark–Sacker at
    ``r = 2`` with ``θ = π/3``; supercritical (an attracting invariant circle, Aronson et al. 1982)."""

    def f(z, r):
        return torch.stack([r * z[0] * (1 - z[1]), z[0]])

    br = continuation(f, _t(1 / 3, 1 / 3), 1.5, (1.5, 2.5), kind="map")
    assert [b.kind for b in br.bifurcations] == ["neimark_sacker"]
    b = br.bifurcations[0]
    assert b.p == pytest.approx(2.0, abs=1e-10)
    assert b.coefficients["theta"] == pytest.approx(math.pi / 3, abs=1e-9)
    assert b.coefficients["d"] < 0


def _bratu(N):
    h = 1.0 / (N + 1)

    def f(u, lam):
        up = torch.cat([u.new_zeros(1), u, u.new_zeros(1)])
        return (up[:-2] - 2 * u + up[2:]) / h**2 + lam * torch.exp(u)

    return f, h


def test_bratu_fold_converges_to_the_continuum_value():
    r"""1-D Bratu ``u'' + λ eᵘ = 0``, ``u(0) = u(1) = 0``: exact solutions
    ``λ = θ²/(2 cosh²(θ/4))``, fold where ``s tanh s = 1`` (``s = θ/4``), ``λ* = 8 s²/cosh² s ≈ 3.51383``.
    Second-order differences on ``N`` points: ``λ_N = λ* + O(h²)``; Richardson extrapolation of
    two grids must match ``λ*`` far better than either grid."""
    s = brentq(lambda s: s * math.tanh(s) - 1, 0.5, 2.0, xtol=1e-15)
    lam_star = 8 * s**2 / math.cosh(s) ** 2
    assert lam_star == pytest.approx(3.513830719, abs=1e-9)
    folds = {}
    for N in (15, 31):
        f, h = _bratu(N)
        br = continuation(f, torch.zeros(N, dtype=F64), 1.0, (1.0, 4.0), max_steps=100)
        assert br.status == Status.CONVERGED  # round the fold and back out through λ = 1
        assert [b.kind for b in br.bifurcations] == ["fold"]
        assert bool(br.stable[0]) and not bool(br.stable[-1])
        fold = br.bifurcations[0]
        assert fold.coefficients["a"] != 0
        folds[h] = fold.p
        assert abs(fold.p - lam_star) < 2.0 * h**2 * lam_star
    (h1, l1), (h2, l2) = sorted(folds.items())
    extrapolated = (h2**2 * l1 - h1**2 * l2) / (h2**2 - h1**2)
    assert abs(extrapolated - lam_star) < 0.05 * abs(l1 - lam_star)
