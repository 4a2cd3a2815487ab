"""The landscape along the unfolding direction: the channel eigenvalue against the normal form."""

from __future__ import annotations

import math

import torch

from ...channels import (
    _rhs_with,
    fit_power_law,
    predicted_channel_eigenvalue,
    real_mode_coefficients,
)
from ...operators import StateNTK
from ._problem import _generator, build_problem, pulse_inputs
from ._results import ChannelLandscape, Progress, TeacherConfig
from ._training import _critical, _load_flat, _Spectrum, _trivial_point


# ----------------------------------------------------------------------------- landscape
def normal_form_response(model, cd, inputs: torch.Tensor, *, dt: float) -> tuple[float, float]:
    """``‖d‖² Σ_{b,t} (∂c_t/∂μ)²`` from the scalar normal form of the critical mode ``cd``, and
    the truncation's nonlinearity ``max_t (2|a₂ c_t| + 3|k₃| c_t²) / |μ|`` (the normal form is
    a small-amplitude expansion: where this is not ``≪ 1`` the comparison is qualitative).

    The critical coordinate follows ``c_{t+1} = c_t + s (μ c_t + a₂ c_t² + k₃ c_t³ + β_t)``
    (``s = dt``, ``μ = λ_c`` for a flow; ``s = 1``, ``μ = m - 1`` for a map) from
    ``c_0 = wᵀ(0 - x*)``, driven by ``β_t = wᵀ (∂f/∂u) u_t``; ``e_t = ∂c_t/∂μ`` obeys
    ``e_{t+1} = e_t + s (c_t + (μ + 2a₂c_t + 3k₃c_t²) e_t)``. A parameter step along ``d̂``
    moves ``μ`` by ``‖d‖``, and the states along ``v``.
    """
    x = cd.x.to(torch.float64)
    w = cd.w.real.to(torch.float64)
    params = {k: t.detach() for k, t in model.named_parameters()}
    u0 = torch.zeros(model.input_size, dtype=torch.float64)
    a2, k3 = real_mode_coefficients(model, cd, u0)
    fu = torch.func.jacrev(lambda uu: _rhs_with(model, params, x, uu))(u0)  # [n, d_in]
    beta = inputs.to(torch.float64) @ (fu.T @ w)  # [B, T]
    flow = cd.kind == "flow"
    s = float(dt) if flow else 1.0
    mu = float(cd.eigenvalue.real) - (0.0 if flow else 1.0)
    c = torch.full((beta.shape[0],), float(w @ (0.0 - x)), dtype=torch.float64)
    e = torch.zeros_like(c)
    total = nonlin = 0.0
    for t in range(beta.shape[1]):
        c, e = (
            c + s * (mu * c + a2 * c**2 + k3 * c**3 + beta[:, t]),
            e + s * (c + (mu + 2 * a2 * c + 3 * k3 * c**2) * e),
        )
        total += float((e**2).sum())
        nonlin = max(nonlin, float((2 * abs(a2) * c.abs() + 3 * abs(k3) * c**2).max()))
    return (
        float(torch.linalg.vector_norm(cd.d[:, 0])) ** 2 * total,
        nonlin / abs(mu) if mu != 0 else math.inf,
    )


def channel_landscape(
    config: TeacherConfig,
    theta: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = None,
) -> ChannelLandscape:
    r"""``ĝᵀ G ĝ`` along the unfolding line ``θ(s) = θ_ref + s d̂`` through the pitchfork.

    ``d̂ = ∂λ_c/∂θ / ‖·‖`` at ``θ_ref`` (the trivial point's eigenvalue sensitivity), so
    ``λ_c(s) ≈ λ_c(θ_ref) + s ‖∂λ_c/∂θ‖``. By default the offsets put ``λ_c`` at
    ``-geomspace(mu_max, mu_min)`` (stable side) and a few positive values (unstable side).
    The probe trials are ``config.landscape_steps`` long (same pulses, then zero input).
    Cost per point: ``r`` JVPs for ``λ_bif`` plus the spectrum of ``G``.
    """
    gen = _generator(config, generator)
    prob = build_problem(config, gen)
    student = prob.student
    names = tuple(n for n, p in student.named_parameters() if p.requires_grad)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    _load_flat(student, names, theta)
    n = config.state_size
    x0 = torch.zeros(n, dtype=torch.float64)
    fp, i = _trivial_point(student, x0, x0[None], gen)
    if i is None:
        raise RuntimeError("no trivial fixed point found at theta_ref")
    x = fp.points[i]
    _, d, cd0 = _critical(student, x, names)
    slope = float(torch.linalg.vector_norm(d))
    dhat = d / slope
    shift = 0.0 if student.kind == "flow" else 1.0  # λ_c - 0 (flow) or multiplier - 1 (map)
    rate = config.dt if student.kind == "flow" else 1.0
    mu0 = float(cd0.eigenvalue.real) - shift
    if offsets is None:
        npts = int(config.landscape_points)
        mus = torch.cat(
            [
                -torch.logspace(
                    math.log10(config.landscape_mu_max),
                    math.log10(config.landscape_mu_min),
                    npts,
                    dtype=torch.float64,
                ),
                torch.linspace(config.landscape_mu_min, 0.3, max(3, npts // 3), dtype=torch.float64),
            ]
        )
        offsets = (mus - mu0) / slope
    offsets = torch.as_tensor(offsets, dtype=torch.float64).reshape(-1)
    u = pulse_inputs(config.trials, config.landscape_steps, config.pulse_steps)
    spec = _Spectrum(config, theta.numel(), gen)
    spec.k = 1
    mu, lam_bif, lam_max, pred, lam_d, nform, nform_nl = [], [], [], [], [], [], []
    for j, s in enumerate(offsets.tolist()):
        _load_flat(student, names, theta + s * dhat)
        fp, i = _trivial_point(student, x, x[None], gen)
        xs = fp.points[i] if i is not None else x
        Q, ds, cd = _critical(student, xs, names)
        mu.append(float(cd.eigenvalue.real) - shift)
        K = StateNTK(student, u)
        JQ = K.engine.jvp(Q.to(K.engine.dtype)).to(torch.float64)
        lam_bif.append(float(torch.linalg.eigvalsh(JQ.T @ JQ).max()))
        Jd = K.engine.jvp((ds / torch.linalg.vector_norm(ds))[:, None].to(K.engine.dtype))
        lam_d.append(float((Jd.to(torch.float64) ** 2).sum()))
        nf_val, nf_nl = (
            normal_form_response(student, cd, u, dt=config.dt)
            if mu[-1] < 0 and cd.is_real
            else (float("nan"), float("nan"))
        )
        nform.append(nf_val)
        nform_nl.append(nf_nl)
        lam, *_ = spec(K.dual())
        lam_max.append(float(lam[0]))
        pred.append(
            predicted_channel_eigenvalue(cd, trials=config.trials, steps=config.landscape_steps, dt=config.dt)
            if mu[-1] < 0
            else float("nan")
        )
        if progress is not None:
            progress(j + 1, offsets.numel())
    mu_t = torch.tensor(mu, dtype=torch.float64)
    order = torch.argsort(offsets)
    s_sorted, mu_sorted = offsets[order], mu_t[order]
    s_c = float("nan")
    for a in range(1, len(order)):
        if float(mu_sorted[a - 1]) < 0 <= float(mu_sorted[a]):
            y0, y1 = float(mu_sorted[a - 1]), float(mu_sorted[a])
            s_c = float(s_sorted[a - 1] + (0 - y0) / (y1 - y0) * (s_sorted[a] - s_sorted[a - 1]))
            break
    if math.isnan(s_c):
        s_c = -mu0 / slope
    lb = torch.tensor(lam_bif, dtype=torch.float64)
    pr_t = torch.tensor(pred, dtype=torch.float64)
    mask = (mu_t < 0) & (mu_t.abs() * config.landscape_steps * rate >= config.landscape_fit_min)
    dist = (offsets - s_c).abs()
    ld = torch.tensor(lam_d, dtype=torch.float64)
    nf = torch.tensor(nform, dtype=torch.float64)
    exp = exp_se = pexp = ratio = exp_d = nf_exp = ratio_d = float("nan")
    if int(mask.sum()) >= 3:
        exp, exp_se = fit_power_law(dist[mask], lb[mask])
        pexp, _ = fit_power_law(dist[mask], pr_t[mask])
        ratio = float((lb[mask] / pr_t[mask]).median())
    both = mask & torch.isfinite(nf)  # the normal form needs the real pitchfork mode
    if int(both.sum()) >= 3:
        exp_d, _ = fit_power_law(dist[both], ld[both])
        nf_exp, _ = fit_power_law(dist[both], nf[both])
        ratio_d = float((ld[both] / nf[both]).median())
    return ChannelLandscape(
        s=offsets,
        mu=mu_t,
        s_c=s_c,
        slope=slope,
        lambda_bif=lb,
        lambda_max=torch.tensor(lam_max, dtype=torch.float64),
        predicted=pr_t,
        fit_mask=mask,
        exponent=exp,
        exponent_se=exp_se,
        predicted_exponent=pexp,
        ratio=ratio,
        trial_steps=int(config.landscape_steps),
        seed=int(config.seed),
        lambda_d=ld,
        normal_form=nf,
        exponent_d=exp_d,
        normal_form_exponent=nf_exp,
        ratio_d=ratio_d,
        normal_form_nonlinearity=torch.tensor(nform_nl, dtype=torch.float64),
    )
