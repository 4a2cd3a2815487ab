"""Channel decomposition: exact split against dense kernels, closed-form critical data,
linear-response prediction and the normal-form scaling exponents."""

import math

import pytest
import torch

import lanczos_ntk as lnk
from lanczos_ntk import channels, models
from lanczos_ntk.testing import dense_jacobian, dense_operator

F64 = torch.float64


def test_split_is_exact_against_dense():
    model = models.CTRNN(4, 2, gain=1.3, seed=0)
    u = 0.3 * torch.randn(3, 5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    K = lnk.StateNTK(model, u)
    J = dense_jacobian(model, u)
    g = torch.randn(K.engine.P, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    K_bif, K_res = channels.split_kernel(K, g)
    Q, _ = torch.linalg.qr(g)
    Pi = Q @ Q.T
    Kb, Kr = dense_operator(K_bif), dense_operator(K_res)
    ref_b = J @ Pi @ J.T
    ref_r = J @ (torch.eye(J.shape[1], dtype=F64) - Pi) @ J.T
    assert (Kb - ref_b).norm() <= 1e-10 * ref_b.norm()
    assert (Kr - ref_r).norm() <= 1e-10 * ref_r.norm()
    assert (Kb + Kr - J @ J.T).norm() <= 1e-10 * (J @ J.T).norm()


def test_split_rejects_bad_directions():
    K = lnk.StateNTK(models.CTRNN(3, 1, seed=0), torch.zeros(2, 3, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"shape \["):
        channels.split_kernel(K, torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="zero"):
        channels.split_kernel(K, torch.zeros(K.engine.P, dtype=F64))


def test_critical_direction_saddle_node_closed_form():
    mu = 0.09
    m = models.ContinuousNormalForm("saddle_node", mu=mu, input_size=1)
    x = torch.tensor([math.sqrt(mu)], dtype=F64)  # stable node of mu - x^2
    d = channels.critical_direction(m, x)
    assert abs(d.eigenvalue - (-2 * math.sqrt(mu))) < 1e-12
    # g = (df/dmu, df/dB)^T w = (1, u = 0)
    torch.testing.assert_close(d.g[:, 0], torch.tensor([1.0, 0.0], dtype=F64))
    assert d.param_names == ("mu", "U")


def test_critical_direction_hopf_pair():
    m = models.ContinuousNormalForm("hopf", mu=-0.2, omega=1.5, input_size=2)
    d = channels.critical_direction(m, torch.zeros(2, dtype=F64), torch.tensor([0.1, -0.2]))
    assert abs(d.eigenvalue.real + 0.2) < 1e-12 and abs(abs(d.eigenvalue.imag) - 1.5) < 1e-12
    assert d.g.shape == (1 + 4, 2)
    A = torch.tensor([[-0.2, -1.5], [1.5, -0.2]], dtype=torch.complex128)
    torch.testing.assert_close(A @ d.v, d.eigenvalue * d.v)
    torch.testing.assert_close(d.w.conj() @ A, d.eigenvalue * d.w.conj())
    assert abs(complex(d.w.conj() @ d.v) - 1) < 1e-12


@pytest.mark.parametrize("kind", ["flow", "map"])
def test_prediction_exact_for_scalar_fold_started_at_the_fixed_point(kind):
    mu, T, B = 0.04, 200, 3
    if kind == "flow":
        m = models.ContinuousNormalForm("saddle_node", mu=mu, dt=0.05)
    else:
        m = models.DiscreteNormalForm("saddle_node", mu=mu)
    x = torch.tensor([math.sqrt(mu)], dtype=F64)
    lam_bif, d = _channel_size(m, x, T=T, B=B)
    pred = channels.predicted_channel_eigenvalue(d, trials=B, steps=T, dt=getattr(m, "dt", 1.0))
    assert abs(lam_bif - pred) <= 1e-9 * pred


def _channel_size(model, x, T, B=1):
    d = channels.critical_direction(model, x)
    u = torch.zeros(B, T, model.input_size, dtype=F64)
    K = lnk.StateNTK(model, u, h0=x.expand(B, -1).clone())
    K_bif, _ = channels.split_kernel(K, d.g)
    JQ = K.engine.jvp(K_bif.basis)
    return float(torch.linalg.eigvalsh(JQ.T @ JQ).max()), d


def test_branch_point_exponent_is_minus_two_for_a_ctrnn():
    base = models.CTRNN(6, 1, gain=1.0, dt=0.2, seed=3)
    W0 = base.W.detach().clone()
    lead = float(torch.linalg.eigvals(W0).real.max())
    g_star = 1.0 / lead  # -I + g W0 loses stability
    dists, sizes = [0.02, 0.04, 0.08, 0.16], []
    for dist in dists:
        m = models.CTRNN(6, 1, gain=1.0, dt=0.2, seed=3)
        with torch.no_grad():
            m.W.copy_(W0 * (g_star * (1 - dist)))
        size, d = _channel_size(m, torch.zeros(6, dtype=F64), T=3000)
        assert abs(d.eigenvalue.real + lead * g_star * dist) < 1e-9  # λ_c = -dist
        sizes.append(size)
    a, se = channels.fit_power_law(dists, sizes)
    assert abs(a + 2) < 0.1, (a, se)


def test_fit_power_law_recovers_exponent_and_rejects_bad_data():
    x = torch.tensor([1.0, 2.0, 4.0, 8.0], dtype=F64)
    a, se = channels.fit_power_law(x, 3 * x**-1.5)
    assert abs(a + 1.5) < 1e-10 and se < 1e-8
    with pytest.raises(ValueError):
        channels.fit_power_law([1.0, 2.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        channels.fit_power_law([1.0, -2.0, 3.0], [1.0, 2.0, 3.0])


def test_channel_report_against_dense(tmp_path):
    m = models.CTRNN(5, 1, gain=1.0, dt=0.2, seed=3)
    W0 = m.W.detach().clone()
    with torch.no_grad():
        m.W.copy_(W0 * 0.9 / float(torch.linalg.eigvals(W0).real.max()))
    d = channels.critical_direction(m, torch.zeros(5, dtype=F64))
    u = torch.zeros(2, 60, 1, dtype=F64)
    h0 = 0.1 * torch.randn(2, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    K = lnk.StateNTK(m, u, h0=h0)
    r = channels.channel_report(K, d.g, tol=1e-10, generator=torch.Generator().manual_seed(1))
    J = dense_jacobian(m, u, h0=h0)
    q = d.g[:, 0] / d.g[:, 0].norm()
    Pi = torch.outer(q, q)
    Kfull, Kb = J @ J.T, J @ Pi @ J.T
    Kr = Kfull - Kb
    ev, vec = torch.linalg.eigh(Kfull)
    lam_b = float(torch.linalg.eigvalsh(Kb)[-1])
    lam_r = float(torch.linalg.eigvalsh(Kr)[-1])
    assert abs(r.lambda_max - float(ev[-1])) <= 1e-8 * float(ev[-1])
    assert abs(r.lambda_bif - lam_b) <= 1e-10 * lam_b
    assert abs(r.lambda_res - lam_r) <= 1e-8 * lam_r
    assert abs(r.amplification - lam_b / lam_r) <= 1e-7 * lam_b / lam_r
    assert abs(r.trace - float(ev.sum())) <= 1e-10 * float(ev.sum())
    assert abs(r.trace_share - float(Kb.trace() / Kfull.trace())) <= 1e-10
    Jg = J @ q
    cos = float((vec[:, -1] @ Jg).abs() / Jg.norm())
    assert abs(r.alignment - cos) <= 1e-6
    assert r.amplification > 5 and r.alignment > 0.99  # close to the branch point: collapsed
    path = r.save(tmp_path / "report")
    assert channels.ChannelReport.load(path) == r


def _sqrt(mu):
    return torch.tensor([math.sqrt(mu)], dtype=F64)


def _zero(n):
    return lambda mu: torch.zeros(n, dtype=F64)


def _kick(*x):
    return lambda mu, xstar: torch.tensor(x, dtype=F64)


def _at_fixed_point(mu, xstar):
    return xstar


# (model(mu), fixed point(mu), initial state, mus, channel, predicted exponent in δ = 1 - |m|)
# static channel g (trials start at x*): λ ∝ ‖g‖² / δ², with ‖g‖² ∝ δ^0 (fold), δ (pitchfork,
# upper branch), δ² (transcritical, upper branch); transient channel d = ∂λ_c/∂θ (trials start
# off x* along the critical mode): λ ∝ Σ t² |m|^{2t} ∝ δ^-3 for every type.
SCALING = {
    "fold flow": (
        lambda mu: models.ContinuousNormalForm("saddle_node", mu=mu, dt=0.25),
        _sqrt,
        _at_fixed_point,
        [0.04, 0.08, 0.16, 0.32],
        "g",
        -2.0,
    ),
    "fold map": (
        lambda mu: models.DiscreteNormalForm("saddle_node", mu=mu),
        _sqrt,
        _at_fixed_point,
        [0.0025, 0.005, 0.01, 0.02],
        "g",
        -2.0,
    ),
    "pitchfork flow": (
        lambda mu: models.ContinuousNormalForm("pitchfork", mu=mu, dt=0.25),
        _sqrt,
        _at_fixed_point,
        [0.1, 0.2, 0.4, 0.8],
        "g",
        -1.0,
    ),
    "pitchfork map": (
        lambda mu: models.DiscreteNormalForm("pitchfork", mu=mu),
        _sqrt,
        _at_fixed_point,
        [0.025, 0.05, 0.1, 0.2],
        "g",
        -1.0,
    ),
    "transcritical flow": (
        lambda mu: models.ContinuousNormalForm("transcritical", mu=mu, dt=0.25),
        lambda mu: torch.tensor([mu], dtype=F64),
        _at_fixed_point,
        [0.2, 0.4, 0.8, 1.6],
        "g",
        0.0,
    ),
    "hopf flow": (
        lambda mu: models.ContinuousNormalForm("hopf", mu=mu, dt=0.1),
        _zero(2),
        _kick(0.02, 0.0),
        [-0.45, -0.65, -0.95, -1.4],
        "d",
        -3.0,
    ),
    "neimark-sacker map": (
        lambda mu: models.DiscreteNormalForm("neimark_sacker", mu=mu),
        _zero(2),
        _kick(0.02, 0.0),
        [-0.04, -0.06, -0.09, -0.14],
        "d",
        -3.0,
    ),
    "flip map": (
        lambda mu: models.DiscreteNormalForm("flip", mu=mu),
        _zero(1),
        _kick(0.02),
        [-0.04, -0.06, -0.09, -0.14],
        "d",
        -3.0,
    ),
    "pitchfork flow, trivial branch": (
        lambda mu: models.ContinuousNormalForm("pitchfork", mu=mu, dt=0.25),
        _zero(1),
        _kick(0.02),
        [-0.16, -0.24, -0.36, -0.54],
        "d",
        -3.0,
    ),
}


def fit_case(case):
    """Fitted exponent (and its standard error) of the top sNTK eigenvalue against δ."""
    make, x_of, h0_of, mus, channel, _ = SCALING[case]
    dists, sizes = [], []
    for mu in mus:
        m = make(mu)
        x = x_of(mu)
        d = channels.critical_direction(m, x)
        mult = abs(1 + m.dt * d.eigenvalue) if m.kind == "flow" else abs(d.eigenvalue)
        dists.append(1 - mult)
        u = torch.zeros(1, 800, m.input_size, dtype=F64)
        K = lnk.StateNTK(m, u, h0=h0_of(mu, x)[None].clone())
        ev, vec = torch.linalg.eigh(dense_operator(K.dual()))
        sizes.append(float(ev[-1]))
        Q, _ = torch.linalg.qr(d.g if channel == "g" else d.d)
        assert float((Q.T @ vec[:, -1]).norm()) > 1 - 1e-8  # the top direction is the channel
    return channels.fit_power_law(dists, sizes)


@pytest.mark.parametrize("case", list(SCALING))
def test_channel_scaling_exponents_on_normal_forms(case):
    a, se = fit_case(case)
    assert abs(a - SCALING[case][-1]) < 0.15, (a, se)


def test_split_spans_the_directions_whatever_their_order():
    K = lnk.StateNTK(models.CTRNN(3, 1, seed=0), 0.3 * torch.ones(2, 3, 1, dtype=F64))
    b = torch.randn(K.engine.P, generator=torch.Generator().manual_seed(4), dtype=F64)
    K_bif, _ = channels.split_kernel(K, torch.stack([torch.zeros_like(b), b], dim=1))
    Q = K_bif.basis
    assert Q.shape[1] == 1
    assert float((b - Q @ (Q.T @ b)).norm()) <= 1e-12 * float(b.norm())


# ---------------------------------------------------------------- static against transient
def _kicked_kernel(model, kick, steps, trials=2):
    h0 = torch.tensor([[kick], [-kick]], dtype=F64)[:trials]
    return lnk.StateNTK(model, torch.zeros(trials, steps, 1, dtype=F64), h0=h0)


@pytest.mark.parametrize("form", ["pitchfork", "transcritical"])
def test_transient_channel_follows_the_delta_cubed_law_where_its_conditions_hold(form):
    """x ↦ x + μx - x³ (or - x²) on the trivial branch x* = 0, trials kicked to ±a: g = 0 and
    the transient channel along d = ∂m/∂μ is λ_d = Σ_b a² Σ_t t² m^{2(t-1)} → 2a²/(4δ³)."""
    deltas = torch.tensor([0.2, 0.1, 0.05], dtype=F64)
    for kick, linear in ((2e-4, True), (0.02, False)):
        lam, law = [], []
        for delta in deltas.tolist():
            model = models.DiscreteNormalForm(form, mu=-delta)
            K = _kicked_kernel(model, kick, 600)
            c = channels.compare_channels(K, channels.critical_direction(model, torch.zeros(1, dtype=F64)))
            assert c.g is None and c.dominant == "d" and c.delta == pytest.approx(delta)
            assert c.conditions["saturated"] and c.conditions["stable"]
            lam.append(c.d.lambda_bif)
            law.append(c.transient_law)
            closed = 2 * kick**2 * sum(t * t * (1 - delta) ** (2 * t - 2) for t in range(1, 601))
            assert c.transient_law == pytest.approx(closed, rel=1e-10)
            if linear:
                assert c.conditions["linear"]
                assert c.d.lambda_bif == pytest.approx(c.predicted_d, rel=1e-3)
        exponent, _ = channels.fit_power_law(deltas, torch.tensor(lam))
        if linear:
            assert exponent == pytest.approx(-3.0, abs=0.1)
        elif form == "transcritical":
            # a = 0.02 is not ≪ δ = 0.05: the report says so, and the law is off
            assert not c.conditions["linear"] and abs(exponent + 3) > 0.15
            assert abs(c.d.lambda_bif / c.predicted_d - 1) > 0.1


def _hopf_ctrnn(eps, dt=0.05):
    """A 2-unit CTRNN with biases whose off-origin fixed point is a distance eps (relative, in
    the gain r) before a Hopf point: W = r [[1, -1], [1, 1]], b = (0.1, -0.05)."""
    from torch.func import jacrev

    R = torch.tensor([[1.0, -1.0], [1.0, 1.0]], dtype=F64)
    b = torch.tensor([0.1, -0.05], dtype=F64)

    def setup(r):
        m = models.CTRNN(2, 1, seed=0, dt=dt)
        with torch.no_grad():
            m.W.copy_(r * R)
            m.b.copy_(b)

        def f(x):
            return -x + torch.tanh(x) @ (r * R).T + b

        x = torch.zeros(2, dtype=F64)
        for _ in range(60):
            x = x - torch.linalg.solve(jacrev(f)(x), f(x))
        return m, x, torch.linalg.eigvals(jacrev(f)(x))

    lo, hi = 0.9, 1.2
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if float(setup(mid)[2].real.max()) < 0 else (lo, mid)
    return setup(lo * (1 - eps))


def test_hopf_network_keeps_the_static_channel_and_the_transient_grows_like_delta_cubed():
    """Near a Hopf point of a network with biases the static channel g is bounded but not small:
    with small kicks it carries the top eigenvalue; the transient channel grows like δ⁻³ and
    only competes at large kicks close to the bifurcation (a²‖d‖²/δ³ against T‖g‖²/|1-m|²)."""
    out = {}
    for eps in (0.3, 0.15):
        model, x, lam = _hopf_ctrnn(eps)
        assert abs(lam[0].imag) > 0.5 and float(lam.real.max()) < 0
        for kick in (0.02, 0.3):
            e = torch.tensor([1.0, 0.0], dtype=F64)
            K = lnk.StateNTK(
                model, torch.zeros(2, 2000, 1, dtype=F64), h0=torch.stack([x + kick * e, x - kick * e])
            )
            c = channels.compare_channels(
                K, channels.critical_direction(model, x), generator=torch.Generator().manual_seed(0)
            )
            assert c.conditions["stable"] and c.conditions["saturated"]
            assert c.dominant == "g" and c.g.alignment > 0.99 and c.g.rank == 2
            assert c.g.lambda_bif == pytest.approx(c.g.lambda_max, rel=1e-3)
            if kick == 0.02:
                assert c.conditions["linear"]
                for rep, pred in ((c.g, c.predicted_g), (c.d, c.predicted_d), (c.joint, c.predicted_joint)):
                    assert rep.lambda_bif == pytest.approx(pred, rel=2e-3)
            else:
                assert not c.conditions["linear"]
            out[eps, kick] = c
    # bounded static channel, δ⁻³ transient law between the two distances
    small, near = out[0.3, 0.02], out[0.15, 0.02]
    assert near.g.lambda_bif < 2 * small.g.lambda_bif
    ratio = (small.delta / near.delta) ** 3
    assert near.transient_law / small.transient_law == pytest.approx(ratio, rel=0.05)
    # without the biases' direction in θ (W only, b = 0, x* = 0) g vanishes and d takes over
    model, _, _ = _hopf_ctrnn(0.15)
    with torch.no_grad():
        model.b.zero_()
    x0 = torch.zeros(2, dtype=F64)
    K = lnk.StateNTK(
        model,
        torch.zeros(2, 2000, 1, dtype=F64),
        params=["W"],
        h0=torch.tensor([[0.02, 0.0], [-0.02, 0.0]], dtype=F64),
    )
    c = channels.compare_channels(
        K, channels.critical_direction(model, x0, params=["W"]), generator=torch.Generator().manual_seed(0)
    )
    assert c.g is None and c.dominant == "d" and c.d.rank == 2
    assert c.d.lambda_bif == pytest.approx(c.predicted_d, rel=1e-2)


def _map_network(kind, r, n=4):
    """A DiscreteRNN whose origin has the multipliers r e^{±2πi/7} (``"ns"``) or -r
    (``"flip"``) and 0.3 otherwise, in a random orthonormal basis."""
    m = models.DiscreteRNN(n, 1, seed=0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(5), dtype=F64))
    D = 0.3 * torch.eye(n, dtype=F64)
    if kind == "ns":
        th = 2 * math.pi / 7
        D[:2, :2] = r * torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=F64)
    else:
        D[0, 0] = -r
    with torch.no_grad():
        m.W.copy_(Q @ D @ Q.T)
    return m, Q


@pytest.mark.parametrize("kind, rank", [("ns", 2), ("flip", 1)])
def test_network_near_neimark_sacker_or_flip_collapses_onto_the_transient_channel(kind, rank):
    """A 4-unit tanh network (not a normal form) with trials kicked along the critical mode:
    as the multiplier approaches the unit circle the kernel's spectrum collapses onto the
    transient channel along d (rank two for Neimark–Sacker, one for flip), λ_d ∝ δ⁻³."""
    deltas, prs, lams, gaps = [0.1, 0.05, 0.025], [], [], []
    for delta in deltas:
        model, Q = _map_network(kind, 1 - delta)
        steps = int(20 / delta)
        h0 = torch.stack([0.01 * Q[:, 0], -0.01 * Q[:, 0]])
        K = lnk.StateNTK(model, torch.zeros(2, steps, 1, dtype=F64), h0=h0, params=["W", "U"])
        cd = channels.critical_direction(model, torch.zeros(4, dtype=F64), params=["W", "U"])
        assert abs(abs(cd.eigenvalue) - (1 - delta)) < 1e-12
        c = channels.compare_channels(K, cd, generator=torch.Generator().manual_seed(0))
        # with zero input and x* = 0 the static channel is zero; d is the channel
        assert c.g is None and c.d.rank == rank and c.dominant == "d"
        assert all(c.conditions.values())
        assert c.d.lambda_bif == pytest.approx(c.predicted_d, rel=2e-3)
        lam = torch.linalg.eigvalsh(dense_operator(K.dual())).flip(0)  # independent truth
        assert float(lam[0]) == pytest.approx(c.d.lambda_max, rel=1e-6)
        assert c.d.lambda_bif > 0.99 * float(lam[0])
        gaps.append(float(lam[rank] / lam[rank - 1]))  # the gap after rank
        assert c.d.alignment > 0.999
        prs.append(float(lam.sum() ** 2 / (lam**2).sum()))
        lams.append(float(lam[0]))
    assert prs[0] > prs[1] > prs[2] and prs[2] == pytest.approx(rank, abs=0.05)
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 0.01
    exponent, _ = channels.fit_power_law(torch.tensor(deltas), torch.tensor(lams))
    assert exponent == pytest.approx(-3.0, abs=0.15)


@pytest.mark.parametrize(
    "form, a2, k3", [("pitchfork", 0.0, -1.0), ("transcritical", -1.0, 0.0), ("saddle_node", -1.0, 0.0)]
)
def test_real_mode_coefficients_of_the_normal_forms(form, a2, k3):
    """x ↦ x + μx - x³ (or - x², or x + μ - x²) at x* = 0: the coefficients in closed form."""
    model = models.DiscreteNormalForm(form, mu=-0.2 if form != "saddle_node" else 0.0)
    cd = channels.critical_direction(model, torch.zeros(1, dtype=F64), derivative="partial")
    got = channels.real_mode_coefficients(model, cd, torch.zeros(1, dtype=F64))
    assert got == pytest.approx((a2, k3), abs=1e-12)
