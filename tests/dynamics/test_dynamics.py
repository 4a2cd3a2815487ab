"""Fixed points, continuation and bifurcation detection on closed-form cases.

Each normal form bifurcates at ``μ = 0``, ``x = 0`` (Kuznetsov 2004, ch. 3–4). Closed forms for
the one- and two-neuron CTRNNs are derived in the test docstrings.
"""

import math

import pytest
import torch

from lanczos_ntk import Status, models
from lanczos_ntk.dynamics import (
    Branch,
    System,
    continuation,
    find_fixed_points,
    system_from_model,
)

F64 = torch.float64


def _zeros(n):
    return torch.zeros(n, dtype=F64)


def _one(kinds, branch):
    assert [b.kind for b in branch.bifurcations] == kinds, branch.bifurcations
    return branch.bifurcations[0]


# ---------------------------------------------------------------------- normal forms
@pytest.mark.parametrize(
    "form,expected",
    [
        ("saddle_node", "fold"),
        ("transcritical", "branch_point"),
        ("pitchfork", "branch_point"),
        ("hopf", "hopf"),
    ],
)
def test_continuous_normal_forms(form, expected):
    if form == "saddle_node":
        m = models.ContinuousNormalForm(form, mu=0.5)
        br = continuation(
            m, torch.tensor([math.sqrt(0.5)], dtype=F64), None, (-1, 1), param="mu", direction=-1
        )
    else:
        m = models.ContinuousNormalForm(form, mu=-0.5)
        br = continuation(m, _zeros(m.state_size), None, (-1, 1), param="mu")
    assert br.status == Status.CONVERGED
    b = _one([expected], br)
    assert abs(b.p) < 1e-10
    assert float(b.x.abs().max()) < 1e-6
    assert m.mu.item() == (0.5 if form == "saddle_node" else -0.5)  # model not mutated
    if expected == "fold":
        assert b.coefficients["a"] == pytest.approx(-1.0, abs=1e-8)  # f = μ - x², B(v,v) = -2
        assert abs(b.eigenvalue) < 1e-6
    elif form == "transcritical":
        assert b.coefficients["a"] == pytest.approx(-1.0, abs=1e-10)
    elif form == "pitchfork":
        assert b.coefficients["a"] == pytest.approx(0.0, abs=1e-10)
    else:
        # ‖q‖ = 1: q = (1, -i)/√2, C(q,q,q̄) = -4q, l₁ = -4/(2ω) = -2/ω
        assert b.coefficients["omega"] == pytest.approx(1.0, abs=1e-10)
        assert b.coefficients["l1"] == pytest.approx(-2.0, abs=1e-10)
        assert b.eigenvalue.imag == pytest.approx(1.0, abs=1e-10)


@pytest.mark.parametrize(
    "form,expected",
    [
        ("saddle_node", "fold"),
        ("transcritical", "branch_point"),
        ("pitchfork", "branch_point"),
        ("flip", "flip"),
        ("neimark_sacker", "neimark_sacker"),
    ],
)
def test_discrete_normal_forms(form, expected):
    if form == "saddle_node":
        m = models.DiscreteNormalForm(form, mu=0.5)
        br = continuation(
            m, torch.tensor([math.sqrt(0.5)], dtype=F64), None, (-1, 1), param="mu", direction=-1
        )
    else:
        m = models.DiscreteNormalForm(form, mu=-0.5)
        br = continuation(m, _zeros(m.state_size), None, (-1, 1), param="mu")
    b = _one([expected], br)
    assert abs(b.p) < 1e-10
    assert float(b.x.abs().max()) < 1e-6
    if expected == "flip":
        assert b.eigenvalue == pytest.approx(-1.0, abs=1e-10)
        assert b.coefficients["c"] == pytest.approx(1.0, abs=1e-10)  # x ↦ -x + x³
    elif expected == "neimark_sacker":
        assert b.coefficients["theta"] == pytest.approx(m.theta, abs=1e-10)
        assert abs(b.eigenvalue) == pytest.approx(1.0, abs=1e-10)
        # z ↦ e^{iθ} z (1 - |z|²) with x = w q + c.c., ‖q‖ = 1: w ↦ e^{iθ} w (1 - 2|w|²), d = -2
        assert b.coefficients["d"] == pytest.approx(-2.0, abs=1e-10)
    else:
        assert b.eigenvalue == pytest.approx(1.0, abs=1e-8)


def test_stability_along_branches():
    m = models.ContinuousNormalForm("pitchfork", mu=-0.5)
    br = continuation(m, _zeros(1), None, (-1, 1), param="mu")
    assert bool((br.stable == (br.p < 0)).all())
    assert br.bifurcations[0].n_unstable_before == 0 and br.bifurcations[0].n_unstable_after == 1


# ---------------------------------------------------------------------- one-neuron CTRNN
def _neuron(w, b=0.0):
    m = models.CTRNN(1, 1, seed=0)
    with torch.no_grad():
        m.W.fill_(w)
        m.b.fill_(b)
    return m


def test_one_neuron_folds_in_bias():
    r"""``dh/dt = -h + w tanh h + b``: folds where ``w tanh'(h*) = 1``, i.e.
    ``h* = ± atanh(√(1 - 1/w))``, at ``b = h* - w tanh h*``; there ``f_hh = -2w tanh h sech² h``,
    so ``a = ½ f_hh = ∓ √(1 - 1/w)`` (``v = w = 1``)."""
    w = 2.0
    m = _neuron(w)
    hs = math.atanh(math.sqrt(1 - 1 / w))
    b_fold = w * math.tanh(hs) - hs
    fp = find_fixed_points(m, p=-1.0, param="b")
    assert fp.status == Status.CONVERGED and len(fp) == 1 and bool(fp.stable.all())
    br = continuation(m, fp.points[0], -1.0, (-1.0, 1.0), param="b")
    assert br.status == Status.CONVERGED
    folds = br.of_kind("fold")
    assert [b.kind for b in br.bifurcations] == ["fold", "fold"]
    assert folds[0].p == pytest.approx(b_fold, abs=1e-10)
    assert folds[1].p == pytest.approx(-b_fold, abs=1e-10)
    assert float(folds[0].x[0]) == pytest.approx(-hs, abs=1e-6)
    s = math.sqrt(1 - 1 / w)
    assert folds[0].coefficients["a"] == pytest.approx(s, abs=1e-7)
    assert folds[1].coefficients["a"] == pytest.approx(-s, abs=1e-7)
    # sensitivities at fixed h: A = -1 + W sech² h  =>  ∂λ/∂W = sech² h* = 1/w, ∂λ/∂b = 0
    sens = folds[0].sensitivities
    assert float(sens["W"].reshape(())) == pytest.approx(1 / w, abs=1e-7)
    assert float(sens["b"].reshape(())) == pytest.approx(0.0, abs=1e-12)
    assert folds[0].sensitivities_total is None  # the branch turns: dλ/dθ does not exist there
    # stable, unstable, stable along the S-curve
    assert bool(br.stable[0]) and bool(br.stable[-1]) and not bool(br.stable.all())
    assert float(br.points[-1, 0]) > hs


def test_one_neuron_pitchfork_in_weight():
    """At ``b = 0`` the trivial state loses stability at ``w = 1`` (``A = -1 + w``)."""
    m = _neuron(0.5)
    br = continuation(m, _zeros(1), None, (0.5, 1.5), param="W")
    b = _one(["branch_point"], br)
    assert b.p == pytest.approx(1.0, abs=1e-10)
    assert b.coefficients["a"] == pytest.approx(0.0, abs=1e-10)  # tanh'' (0) = 0


def test_two_neuron_hopf_and_lyapunov_coefficient():
    r"""``W = p [[1, -c], [c, 1]]``: ``A(0) = -I + W`` has ``λ = -1 + p(1 ± ic)``, Hopf at ``p = 1``,
    ``ω = c``. With ``tanh h = h - h³/3``: ``B = 0``, ``C(u,v,w) = -2W(u⊙v⊙w)``; for
    ``q = (1, -i)/√2``: ``q⊙q⊙q̄ = q/2``, ``⟨p, C(q,q,q̄)⟩ = -(1 + ic)``, so ``l₁ = -1/(2c)``."""
    c = 2.0
    m = models.CTRNN(2, 1, seed=0)
    with torch.no_grad():
        m.W.copy_(torch.tensor([[1.0, -c], [c, 1.0]], dtype=F64))
    br = continuation(m, _zeros(2), 0.5, (0.5, 1.5), param="W")
    b = _one(["hopf"], br)
    assert b.p == pytest.approx(1.0, abs=1e-10)
    assert b.coefficients["omega"] == pytest.approx(c, abs=1e-10)
    assert b.coefficients["l1"] == pytest.approx(-1 / (2 * c), abs=1e-10)
    # v, w normalisation and the eigen-equations
    A = -torch.eye(2, dtype=F64) + torch.tensor([[1.0, -c], [c, 1.0]], dtype=F64)
    lam = b.eigenvalue
    torch.testing.assert_close(A.to(torch.complex128) @ b.v, lam * b.v)
    torch.testing.assert_close(b.w.conj() @ A.to(torch.complex128), lam * b.w.conj())
    assert float(torch.linalg.vector_norm(b.v)) == pytest.approx(1.0)
    assert complex(b.w.conj() @ b.v) == pytest.approx(1.0)
    # critical direction: g is [2, P] (real and imaginary part of w)
    assert b.g.shape == (2, sum(b.param_numels))


def test_continuation_backwards_and_window():
    f = lambda x, p: p - x**2  # noqa: E731
    br = continuation(f, torch.tensor([1.0], dtype=F64), 1.0, (0.5, 2.0), direction=1)
    assert br.status == Status.CONVERGED and float(br.p[-1]) == pytest.approx(2.0, abs=1e-12)
    assert bool((br.p >= 0.5).all()) and bool((br.p <= 2.0).all())
    br = continuation(f, torch.tensor([1.0], dtype=F64), 1.0, (0.5, 2.0), direction=-1)
    assert float(br.p[-1]) == pytest.approx(0.5, abs=1e-12) and not br.bifurcations
    br = continuation(f, torch.tensor([1.0], dtype=F64), 1.0, (-1.0, 2.0), max_steps=3)
    assert br.status == Status.MAX_ITERATIONS and br.num_steps == 3 and len(br) == 4


# ---------------------------------------------------------------------- fixed points
def test_fixed_points_of_bistable_neuron():
    """``w = 2, b = 0``: fixed points ``0`` (unstable) and ``±h_s`` with ``h_s = 2 tanh h_s``."""
    m = _neuron(2.0)
    fp = find_fixed_points(m, generator=torch.Generator().manual_seed(3), seed_scale=2.0)
    assert fp.status == Status.CONVERGED and len(fp) == 3
    order = torch.argsort(fp.points[:, 0])
    pts, stable = fp.points[order, 0], fp.stable[order]
    hs = float(pts[2])
    assert hs == pytest.approx(2 * math.tanh(hs), abs=1e-10)
    assert float(pts[0]) == pytest.approx(-hs, abs=1e-9) and abs(float(pts[1])) < 1e-9
    assert stable.tolist() == [True, False, True]
    assert float(fp.residuals.max()) <= 1e-10
    assert int(fp.counts.sum()) == fp.num_converged


def test_fixed_points_explicit_seeds_map_and_inputs():
    fp = find_fixed_points(lambda x, p: x - x**3, torch.linspace(-2, 2, 9, dtype=F64)[:, None], p=0.0)
    assert sorted(round(float(v), 8) for v in fp.points[:, 0]) == [-1.0, 0.0, 1.0]
    # a map: logistic r x (1 - x) at r = 2.5 has fixed points 0 (unstable) and 0.6 (stable)
    s = System(lambda x, r: r * x * (1 - x), 1, "map")
    fp = find_fixed_points(s, torch.tensor([[0.01], [0.3], [0.9]], dtype=F64), p=2.5)
    got = {round(float(x), 8): bool(st) for x, st in zip(fp.points[:, 0], fp.stable)}
    assert got == {0.0: False, 0.6: True}
    # several constant inputs, batched over seeds for each
    m = _neuron(0.5)
    u = torch.tensor([[0.0], [1.0]], dtype=F64)
    fp = find_fixed_points(m, u=u, num_seeds=8)
    assert fp.input_index.tolist() == [0, 1]
    B = float(m.U.detach().reshape(()))
    for x, k in zip(fp.points[:, 0], fp.input_index):
        x = float(x)
        assert -x + 0.5 * math.tanh(x) + B * float(u[k]) == pytest.approx(0.0, abs=1e-10)


def test_fixed_points_of_random_network_match_eigendecomposition():
    m = models.CTRNN(20, 1, gain=0.8, seed=4)
    fp = find_fixed_points(m, num_seeds=16)
    assert len(fp) == 1 and float(fp.points.abs().max()) < 1e-9  # contracting: only h = 0
    ev = torch.linalg.eigvals(-torch.eye(20, dtype=F64) + m.W.detach())
    assert float(fp.eigenvalues[0, 0].real) == pytest.approx(float(ev.real.max()), abs=1e-10)


# ---------------------------------------------------------------------- large random network
def test_random_ctrnn_200_loses_stability_at_predicted_gain():
    r"""``h = 0`` with ``W = g W₀ / g₀``: ``A = -I + (g/g₀) W₀`` has eigenvalues
    ``-1 + (g/g₀) ν_k``, so ``h = 0`` loses stability at ``g* = g₀ / max Re ν``; a branch point if
    that ``ν`` is real, a Hopf point if complex. Every further crossing in the window is found."""
    g0 = 1.5
    m = models.CTRNN(200, 1, gain=g0, seed=0)
    nu = torch.linalg.eigvals(m.W.detach())
    lead = nu[int(torch.argmax(nu.real))]
    g_star = g0 / float(lead.real)
    lo, hi = 0.95 * g_star, 1.1 * g_star
    br = continuation(m, _zeros(200), lo, (lo, hi), param="gain", ds=0.03 * g_star)
    assert br.status == Status.CONVERGED
    first = br.bifurcations[0]
    assert first.kind == ("hopf" if abs(float(lead.imag)) > 1e-12 else "branch_point")
    assert first.p == pytest.approx(g_star, rel=1e-10)
    crossings = sorted(
        g0 / float(v.real) for v in nu if v.real > 0 and v.imag >= 0 and lo < g0 / float(v.real) < hi
    )
    assert len(br.bifurcations) == len(crossings)
    for b, c in zip(br.bifurcations, crossings):
        assert b.p == pytest.approx(c, rel=1e-9)
    assert bool(br.stable[0]) and not bool(br.stable[-1])


def test_random_discrete_rnn_loses_stability_at_predicted_gain():
    r"""Map ``h ↦ tanh(W h)`` at ``h = 0``: multipliers ``(g/g₀) ν_k``, so ``h = 0`` loses
    stability at ``g* = g₀ / max |ν|``: branch point (``ν > 0``), flip (``ν < 0``) or
    Neimark–Sacker (complex ``ν``) with ``θ = arg ν``."""
    m = models.DiscreteRNN(60, 1, gain=1.0, seed=2)
    nu = torch.linalg.eigvals(m.W.detach())
    lead = nu[int(torch.argmax(nu.abs()))]
    g_star = 1.0 / float(lead.abs())
    br = continuation(m, _zeros(60), 0.95 * g_star, (0.95 * g_star, 1.03 * g_star), param="gain")
    first = br.bifurcations[0]
    if abs(float(lead.imag)) > 1e-12:
        assert first.kind == "neimark_sacker"
        assert first.coefficients["theta"] == pytest.approx(
            abs(math.atan2(float(lead.imag), float(lead.real)))
        )
    else:
        assert first.kind == ("branch_point" if float(lead.real) > 0 else "flip")
    assert first.p == pytest.approx(g_star, rel=1e-10)


def test_branch_save_load_round_trip(tmp_path):
    m = models.CTRNN(2, 1, seed=0)
    with torch.no_grad():
        m.W.copy_(torch.tensor([[1.0, -2.0], [2.0, 1.0]], dtype=F64))
    br = continuation(m, _zeros(2), 0.5, (0.5, 1.5), param="W")
    br.save(tmp_path / "branch")
    back = Branch.load(tmp_path / "branch")
    assert isinstance(back, Branch) and back.status == br.status
    assert back.config == br.config and back.config["p_span"] == [0.5, 1.5]
    torch.testing.assert_close(back.points, br.points)
    torch.testing.assert_close(back.leading_eigenvalues, br.leading_eigenvalues)
    b0, b1 = br.bifurcations[0], back.bifurcations[0]
    assert b1.kind == b0.kind and b1.p == b0.p and b1.eigenvalue == b0.eigenvalue
    assert b1.coefficients == b0.coefficients
    torch.testing.assert_close(b1.v, b0.v)
    torch.testing.assert_close(b1.sensitivities["W"], b0.sensitivities["W"])
    assert b1.param_names == b0.param_names


def test_system_from_model_parameters():
    m = models.CTRNN(3, 2, gain=1.5, seed=1)
    x = torch.randn(3, dtype=F64, generator=torch.Generator().manual_seed(0))
    u = torch.tensor([0.3, -0.2], dtype=F64)
    s = system_from_model(m, "gain", u)
    assert s.p0 == 1.5 and s.kind == "flow"
    torch.testing.assert_close(s(x, 1.5), m.rhs(x, u))
    torch.testing.assert_close(s(x, 3.0) + x, 2 * (m.rhs(x, u) + x - u @ m.U.T) + u @ m.U.T)
    s = system_from_model(m, "input", u)
    torch.testing.assert_close(s(x, 2.0), m.rhs(x, 2 * u))
    s = system_from_model(m, lambda p, params, uu: ({**params, "b": params["b"] + p}, uu), u, p0=0.0)
    torch.testing.assert_close(s(x, 0.5), m.rhs(x, u) + 0.5)
    assert set(s.params_at(0.0)) == {"W", "U", "b"}
    with pytest.raises(ValueError, match="unknown continuation parameter"):
        system_from_model(m, "nope")
    with pytest.raises(ValueError, match="p0"):
        system_from_model(m, lambda p, params, uu: (params, uu))


def test_euler_map_loses_stability_before_the_flow():
    """ẋ = (μ + iω) z - |z|² z simulated by Euler steps: at μ = -0.05, dt = 0.2, ω = 1 the flow's
    origin is stable (Re λ = -0.05) but the Euler map's multiplier is |1 + dt λ| = 1.00995; the
    model's own simulation grows, and the branch locates the map's loss of stability at
    μ = (√(1 - dt²ω²) - 1)/dt."""
    dt, mu = 0.2, -0.05
    model = models.ContinuousNormalForm("hopf", mu=mu, dt=dt)
    fp = find_fixed_points(model, p=mu, param="mu", num_seeds=8, generator=torch.Generator().manual_seed(0))
    i = int(fp.points.norm(dim=1).argmin())
    assert float(fp.points[i].norm()) < 1e-10 and bool(fp.stable[i])
    m = math.hypot(1 + dt * mu, dt)
    assert fp.dt == dt and float(fp.euler_max_multiplier[i]) == pytest.approx(m, rel=1e-12)
    assert not bool(fp.euler_stable[i])
    # the simulation (the model's forward, i.e. what the kernel differentiates) grows like m^t
    h0 = torch.tensor([[1e-6, 0.0]], dtype=F64)
    with torch.no_grad():
        traj = model(torch.zeros(1, 400, 1, dtype=F64), h0=h0)[0]
    growth = float(traj[-1].norm() / h0.norm())
    assert growth == pytest.approx(m**400, rel=1e-3)
    br = continuation(model, torch.zeros(2, dtype=F64), -0.5, (-0.5, 0.3), param="mu")
    (mu_e,) = br.euler_stability_changes()
    assert mu_e == pytest.approx((math.sqrt(1 - dt**2) - 1) / dt, abs=1e-3)
    assert [b.kind for b in br.bifurcations] == ["hopf"]
    assert bool(br.euler_stable[0]) and not bool(br.euler_stable[-1])
    # maps have no Euler step
    assert (
        find_fixed_points(
            models.DiscreteNormalForm("pitchfork", mu=-0.5), p=-0.5, param="mu", num_seeds=4
        ).euler_stable
        is None
    )
    with pytest.raises(ValueError, match="Euler step of a flow"):
        System(lambda x, p: x, n=1, kind="map", dt=0.1)
