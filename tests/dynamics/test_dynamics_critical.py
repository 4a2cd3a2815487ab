"""Critical data against finite differences, other models, and bad input."""

import math

import pytest
import torch
from torch.func import jacrev

from lanczos_ntk import Status, models
from lanczos_ntk.dynamics import (
    FixedPoints,
    System,
    continuation,
    critical_data,
    find_fixed_points,
    system_from_model,
)

F64 = torch.float64


def _nearest(eigs, lam):
    return complex(eigs[int(torch.argmin((eigs - lam).abs()))])


def _check_sensitivities(system, x, p, bif):
    data = critical_data(system, x, p, bif)
    lam = data["eigenvalue"]
    params = system.params_at(p)
    eps = 1e-6

    def lam_at(th, pp=p):
        A = jacrev(lambda xx: system.f_params(xx, pp, th))(x) if pp == p else system.jacobian(x, pp)
        return _nearest(torch.linalg.eigvals(A), lam)

    for name, value in params.items():
        fd = torch.zeros(value.numel(), dtype=torch.complex128)
        for k in range(value.numel()):
            e = torch.zeros(value.numel(), dtype=F64)
            e[k] = eps
            plus = {**params, name: value + e.reshape(value.shape)}
            minus = {**params, name: value - e.reshape(value.shape)}
            fd[k] = (lam_at(plus) - lam_at(minus)) / (2 * eps)
        got = data["sensitivities"][name].reshape(-1).to(torch.complex128)
        torch.testing.assert_close(got, fd, atol=1e-6, rtol=1e-5)
    # ∂λ/∂p at fixed x
    fd_p = (
        _nearest(torch.linalg.eigvals(system.jacobian(x, p + eps)), lam)
        - _nearest(torch.linalg.eigvals(system.jacobian(x, p - eps)), lam)
    ) / (2 * eps)
    assert data["eigenvalue_dp"] == pytest.approx(fd_p, abs=1e-6)
    # g = (∂f/∂θ)ᵀ w against the explicit parameter Jacobian
    names = data["param_names"]
    J = jacrev(lambda th: system.f_params(x, p, th))(params)
    Jflat = torch.cat([J[k].reshape(system.n, -1) for k in names], dim=1)
    w = data["w"]
    rows = [w.real, w.imag] if w.is_complex() else [w]
    torch.testing.assert_close(data["g"], torch.stack([Jflat.T @ r.to(F64) for r in rows]))
    assert data["g"].shape[1] == sum(data["param_numels"])
    return data


def test_sensitivities_match_finite_differences_flow():
    m = models.CTRNN(3, 2, gain=2.0, seed=5)
    u = torch.tensor([0.4, -0.3], dtype=F64)
    system = system_from_model(m, "gain", u)
    fp = find_fixed_points(system, num_seeds=16)
    x = fp.points[0]
    eigs = fp.eigenvalues[0]
    has_complex = bool((eigs.imag.abs() > 1e-8).any())
    _check_sensitivities(system, x, 2.0, "hopf" if has_complex else "fold")
    if bool((eigs.imag.abs() <= 1e-8).any()):
        _check_sensitivities(system, x, 2.0, "fold")


def test_sensitivities_match_finite_differences_map():
    m = models.DiscreteRNN(4, 1, gain=1.3, seed=2)
    system = system_from_model(m, "input", torch.tensor([0.5], dtype=F64))
    fp = find_fixed_points(system, num_seeds=16)
    x = fp.points[0]
    eigs = fp.eigenvalues[0]
    bif = "neimark_sacker" if bool((eigs.imag.abs() > 1e-8).any()) else "fold"
    _check_sensitivities(system, x, 1.0, bif)
    if bool(((eigs.imag.abs() <= 1e-8) & (eigs.real < 0)).any()):
        _check_sensitivities(system, x, 1.0, "flip")


def test_diagonal_ssm_and_gru_fixed_points():
    ssm = models.DiagonalSSM(3, 2, seed=1)
    fp = find_fixed_points(ssm, num_seeds=4)
    assert len(fp) == 1 and float(fp.points.abs().max()) < 1e-10 and bool(fp.stable.all())
    lam = ssm.eigenvalues().detach()
    expected = torch.cat([lam, lam.conj()])
    got = fp.eigenvalues[0]
    for z in expected:
        assert float((got - z).abs().min()) < 1e-10
    gru = models.GRU(4, 2, seed=3)
    fp = find_fixed_points(gru, torch.zeros(1, 4, dtype=F64))
    assert len(fp) == 1 and float(fp.points.abs().max()) < 1e-12
    A = jacrev(lambda h: gru.rhs(h, torch.zeros(2, dtype=F64)))(torch.zeros(4, dtype=F64)).detach()
    assert float(fp.eigenvalues[0].abs().max()) == pytest.approx(
        float(torch.linalg.eigvals(A).abs().max()), abs=1e-10
    )


def test_fixed_points_save_load(tmp_path):
    fp = find_fixed_points(lambda x, p: x - x**3, torch.linspace(-2, 2, 5, dtype=F64)[:, None])
    fp.save(tmp_path / "fp")
    back = FixedPoints.load(tmp_path / "fp")
    torch.testing.assert_close(back.points, fp.points)
    torch.testing.assert_close(back.eigenvalues, fp.eigenvalues)
    assert back.status == fp.status and back.kind == "flow"
    assert back.config == fp.config and back.config["seed"] == 0


# ---------------------------------------------------------------------- bad input
def test_start_not_near_a_fixed_point():
    br = continuation(lambda x, p: 1 + x**2 + p * 0, torch.zeros(1, dtype=F64), 0.0, (-1, 1))
    assert br.status == Status.FAILED and len(br) == 0
    assert "not near a fixed point" in br.message
    with pytest.raises(RuntimeError, match="failed"):
        br.raise_for_status()
    fp = find_fixed_points(
        lambda x, p: 1 + x**2, torch.randn(4, 1, dtype=F64, generator=torch.Generator().manual_seed(0))
    )
    assert fp.status == Status.FAILED and len(fp) == 0 and "no seed converged" in fp.message


def test_non_finite_values_stop_with_the_points_so_far():
    # x = √p: the branch reaches p = 0, beyond which f is NaN
    br = continuation(
        lambda x, p: torch.sqrt(p) - x, torch.ones(1, dtype=F64), 1.0, (-1.0, 2.0), direction=-1
    )
    assert br.status == Status.PARTIAL and len(br) > 2
    assert bool(torch.isfinite(br.points).all()) and bool((br.p >= 0).all())
    assert "ds_min" in br.message
    br = continuation(lambda x, p: torch.log(p) - x, torch.ones(1, dtype=F64), -1.0, (-2.0, 2.0))
    assert br.status == Status.FAILED and "non-finite" in br.message
    fp = find_fixed_points(lambda x, p: torch.log(x), -torch.ones(3, 1, dtype=F64))
    assert fp.status == Status.FAILED


def test_window_without_solutions_and_skipped_critical_data(tmp_path):
    br = continuation(lambda x, p: p - x**2, torch.zeros(1, dtype=F64), -1.5, (-2.0, -1.0))
    assert br.status == Status.FAILED and len(br) == 0
    br = continuation(
        lambda x, p: p - x**2, torch.ones(1, dtype=F64), 1.0, (-1.0, 2.0), direction=-1, critical=False
    )
    b = br.bifurcations[0]
    assert b.kind == "fold" and abs(b.p) < 1e-12 and b.eigenvalue_dp is None and b.v.numel() == 0
    br.save(tmp_path / "b")
    assert type(br).load(tmp_path / "b").bifurcations[0].eigenvalue_dp is None


def test_singular_jacobian_where_newton_cannot_proceed():
    # the only solution of x² + p² = 0 is (0, 0), where [G_x, G_p] = 0
    br = continuation(lambda x, p: x**2 + p**2, torch.zeros(1, dtype=F64), 0.0, (-1.0, 1.0))
    assert br.status == Status.PARTIAL and "ds_min" in br.message
    assert float(br.points.abs().max()) < 1e-6 and float(br.p.abs().max()) < 1e-6


def test_invalid_arguments():
    f = lambda x, p: p - x**2  # noqa: E731
    x0 = torch.ones(1, dtype=F64)
    with pytest.raises(ValueError, match="outside the window"):
        continuation(f, x0, 3.0, (0.0, 2.0))
    with pytest.raises(ValueError, match="lo < hi"):
        continuation(f, x0, 1.0, (2.0, 0.0))
    with pytest.raises(ValueError, match="direction"):
        continuation(f, x0, 1.0, (0.0, 2.0), direction=0)
    with pytest.raises(ValueError, match="kind"):
        continuation(models.ContinuousNormalForm("pitchfork"), x0, None, (-1, 1), kind="map", param="mu")
    with pytest.raises(ValueError, match="kind"):
        System(f, 1, "ode")
    with pytest.raises(ValueError, match="param="):
        continuation(models.ContinuousNormalForm("pitchfork"), x0, 0.0, (-1, 1))
    with pytest.raises(ValueError, match="state of shape"):
        continuation(System(f, 2), x0, 1.0, (0.0, 2.0))
    with pytest.raises(ValueError, match="seeds"):
        find_fixed_points(f, torch.ones(3, dtype=F64))
    with pytest.raises(ValueError, match="ds_min"):
        continuation(f, x0, 1.0, (0.0, 2.0), ds=-1.0)
    assert math.isfinite(continuation(f, x0, 1.0, (-1.0, 2.0), direction=-1).bifurcations[0].p)


# ---------------------------------------------------------------- dλ/dθ along the branch
@pytest.mark.parametrize(
    "model_cls, form, mu, partial, total",
    [
        # ẋ = μx - x³ at x* = √μ: λ = μ - 3x*² = -2μ; at fixed x ∂λ/∂μ = 1
        (models.ContinuousNormalForm, "pitchfork", 0.25, 1.0, -2.0),
        # ẋ = μ - x² at x* = √μ: λ = -2x* = -2√μ; ∂λ/∂μ = 0 at fixed x, dλ/dμ = -1/√μ
        (models.ContinuousNormalForm, "saddle_node", 0.25, 0.0, -2.0),
        # x ↦ x + μx - x³ at x* = √μ: multiplier 1 + μ - 3x*² = 1 - 2μ
        (models.DiscreteNormalForm, "pitchfork", 0.16, 1.0, -2.0),
        # x ↦ x + μ - x² at x* = √μ: multiplier 1 - 2√μ, d/dμ = -1/√μ
        (models.DiscreteNormalForm, "saddle_node", 0.16, 0.0, -2.5),
    ],
)
def test_total_derivative_along_the_branch_in_closed_form(model_cls, form, mu, partial, total):
    from lanczos_ntk.channels import critical_direction

    model = model_cls(form, mu=mu)
    x = torch.tensor([math.sqrt(mu)], dtype=F64)
    system = system_from_model(model, param="mu")
    data = critical_data(system, x, mu, "fold")
    assert data["eigenvalue"].real == pytest.approx(
        (-2 * mu if form == "pitchfork" else -2 * math.sqrt(mu)) + (model.kind == "map"), abs=1e-12
    )
    assert float(data["sensitivities"]["mu"]) == pytest.approx(partial, abs=1e-12)
    assert float(data["sensitivities_total"]["mu"]) == pytest.approx(total, abs=1e-10)
    assert data["eigenvalue_dp"].real == pytest.approx(partial, abs=1e-12)  # p is μ: at fixed x
    cd = critical_direction(model, x)
    names = list(cd.param_names)
    assert cd.derivative == "total"
    assert float(cd.d[names.index("mu"), 0]) == pytest.approx(total, abs=1e-10)
    assert float(cd.d_partial[names.index("mu"), 0]) == pytest.approx(partial, abs=1e-12)
    # the input weight B enters f only through u = 0: it moves nothing
    assert float(cd.d[names.index("U"), 0]) == pytest.approx(0.0, abs=1e-14)
    part = critical_direction(model, x, derivative="partial")
    torch.testing.assert_close(part.d, cd.d_partial)


def _newton(f, x, steps=50):
    for _ in range(steps):
        x = x - torch.linalg.solve(jacrev(f)(x), f(x))
    return x


@pytest.mark.parametrize("gain, complex_mode", [(1.4, False), (2.5, True)])
def test_total_derivative_matches_finite_differences_of_the_moving_fixed_point(gain, complex_mode):
    """A CTRNN with biases (the fixed point is off the origin): perturb each parameter, find the
    fixed point again by Newton's method and take the eigenvalue; compare with d."""
    from lanczos_ntk.channels import critical_direction

    n = 3
    g = torch.Generator().manual_seed(3)
    model = models.CTRNN(n, 1, gain=gain, seed=4)
    with torch.no_grad():
        if complex_mode:  # a rotation block in W: a complex leading pair
            model.W.copy_(torch.tensor([[1.2, -2.0, 0.1], [2.0, 1.2, 0.0], [0.0, 0.3, -0.5]], dtype=F64))
        model.b.copy_(0.4 * torch.randn(n, generator=g, dtype=F64))
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    u = torch.zeros(1, dtype=F64)

    def rhs(th, x):
        return -x + torch.tanh(x) @ th["W"].T + u @ th["U"].T + th["b"]

    x0 = _newton(lambda x: rhs(params, x), torch.zeros(n, dtype=F64))
    cd = critical_direction(model, x0)
    lam0 = cd.eigenvalue
    assert (abs(lam0.imag) > 1e-3) == complex_mode
    names = list(cd.param_names)
    offsets = torch.cumsum(torch.tensor([0] + [params[k].numel() for k in names]), 0)
    eps = 1e-6
    fd_total, fd_partial = [], []
    for name in names:
        for j in range(params[name].numel()):
            vals = []
            for sgn in (1, -1):
                th = {k: v.clone() for k, v in params.items()}
                th[name].view(-1)[j] += sgn * eps
                xs = _newton(lambda x, th=th: rhs(th, x), x0.clone())
                for xx in (xs, x0):
                    ev = torch.linalg.eigvals(jacrev(lambda x, th=th: rhs(th, x))(xx))
                    vals.append(complex(ev[int(torch.argmin((ev - lam0).abs()))]))
            fd_total.append((vals[0] - vals[2]) / (2 * eps))
            fd_partial.append((vals[1] - vals[3]) / (2 * eps))
    fd_total = torch.tensor(fd_total, dtype=torch.complex128)
    fd_partial = torch.tensor(fd_partial, dtype=torch.complex128)
    assert int(offsets[-1]) == cd.d.shape[0]
    torch.testing.assert_close(cd.d[:, 0], fd_total.real, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cd.d_partial[:, 0], fd_partial.real, atol=1e-6, rtol=1e-5)
    if complex_mode:
        torch.testing.assert_close(cd.d[:, 1], fd_total.imag, atol=1e-6, rtol=1e-5)
    # with biases the fixed point moves and the two derivatives really differ
    assert float((cd.d - cd.d_partial).abs().max()) > 1e-2


def test_total_derivative_does_not_exist_at_a_fold():
    from lanczos_ntk.channels import critical_direction

    model = models.ContinuousNormalForm("saddle_node", mu=0.0)
    x = torch.zeros(1, dtype=F64)
    with pytest.raises(ValueError, match="derivative='partial'"):
        critical_direction(model, x)
    assert float(critical_direction(model, x, derivative="partial").d[0, 0]) == 0.0
    data = critical_data(system_from_model(model, param="mu"), x, 0.0, "fold")
    assert data["sensitivities_total"] is None
    # at the symmetric pitchfork's branch point ∇_x λ = 0: the total exists and equals the partial
    pf = critical_data(
        system_from_model(models.ContinuousNormalForm("pitchfork", mu=0.0), param="mu"),
        x,
        0.0,
        "branch_point",
    )
    assert float(pf["sensitivities_total"]["mu"]) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="expected derivative"):
        critical_direction(model, x, derivative="full")
