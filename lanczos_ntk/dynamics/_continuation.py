r"""Pseudo-arclength continuation of fixed points with bifurcation detection and location.

Keller's method (Keller 1977; Allgower & Georg 1990, ch. 2): from a point ``y_i = (x_i, p_i)``
with unit tangent ``t_i`` (``[G_x, G_p] t_i = 0``), predict ``y_i + ds t_i`` and correct with
Newton's method on the bordered system ``G(y) = 0``, ``t_iᵀ (y - y_i) = ds``, whose Jacobian
``[[G_x, G_p], [t_iᵀ]]`` stays regular at folds, so the branch is followed around them.

Test functions between consecutive points:

- fold: the ``p``-component of the tangent changes sign;
- branch point: ``sign det [[G_x, G_p], [tᵀ]]`` changes (the tangent keeps its orientation);
- flip (maps): ``sign det(A + I)`` changes;
- Hopf (flows) / Neimark–Sacker (maps): the number of complex eigenvalues with ``Re λ > 0``
  (``|μ| > 1``) changes together with the total count of unstable eigenvalues.

Determinants enter only through ``slogdet`` signs (no overflow for large ``n``), and the step is
bisected until each piece holds one event, so many eigenvalues crossing in one step are
separated. Each event is then located by Brent's method on a continuous test function of the
pseudo-arclength (the tangent's ``p``-component, a determinant relative to the bracket start,
or the signed distance of the critical eigenvalue to the stability boundary). Points on the
branch very close to a branch point are ill-conditioned, so a bracketed branch point is
polished by Newton's method on the extended system ``G + βφ = 0``, ``G_yᵀφ = 0``, ``φᵀφ = 1``,
which is regular there (Moore 1980).

References: Keller, *Numerical solution of bifurcation and nonlinear eigenvalue problems* (1977);
Allgower & Georg, *Numerical Continuation Methods* (1990); Kuznetsov, *Elements of Applied
Bifurcation Theory*, 3rd ed. (2004), ch. 10; Govaerts, *Numerical Methods for Bifurcations of
Dynamical Equilibria* (2000).
"""

from __future__ import annotations

import math

import torch

from .._results import Status
from ._critical import critical_data, critical_eigenvalue, euler_fields
from ._dense import svd
from ._results import Bifurcation, Branch
from ._system import System, as_system
from ._tracer import (
    CorrectorError,
    Point,
    Tracer,
    find_events,
    leaf_kinds,
    locate,
    psi_function,
    refine_branch_point,
)

__all__ = ["continuation"]

_LEADING = 6


def continuation(
    f,
    x0,
    p0: float | None,
    p_span: tuple[float, float],
    kind: str | None = None,
    *,
    param=None,
    u: torch.Tensor | None = None,
    ds: float | None = None,
    ds_min: float | None = None,
    ds_max: float | None = None,
    max_steps: int = 500,
    direction: int = 1,
    tol: float = 1e-10,
    max_newton: int = 10,
    max_angle: float = 0.5,
    detect: bool = True,
    critical: bool = True,
    locate_tol: float = 1e-13,
) -> Branch:
    r"""Trace a branch of fixed points of ``f(x, p)`` in ``p`` and locate its bifurcations.

    Parameters
    ----------
    f : callable, System or model
        ``f(x, p)`` (vector field of a flow, or a map), a :class:`System`, or a model of
        :mod:`lanczos_ntk.models` (with ``param`` and ``u``, see :func:`system_from_model`).
    x0 : tensor ``[n]``
        A state at or near a fixed point at ``p0`` (corrected by Newton at fixed ``p0`` first).
    p0 : float or None
        Starting parameter (``None``: the system's ``p0``).
    p_span : (lo, hi)
        Parameter window; the branch stops (pinned to the boundary) when it leaves it.
    kind : {"flow", "map"}, optional
        For a plain callable (default ``"flow"``); must agree with a system's or model's kind.
    param, u : optional
        For a model: the continuation parameter and the constant input (see
        :func:`system_from_model`); ``param`` is required for a model.
    ds, ds_min, ds_max : float
        Initial, smallest and largest pseudo-arclength step in ``(x, p)``; defaults
        ``0.02 L``, ``1e-9 L``, ``0.1 L`` with ``L = hi - lo``.
    max_steps : int
        Maximum number of accepted steps.
    direction : {+1, -1}
        Initial direction in ``p``.
    tol, max_newton : float, int
        Newton tolerance on ``‖G‖_∞`` and iteration cap of the corrector (a step that needs more
        is halved; 3 or fewer lets it grow by 1.5).
    max_angle : float
        A step is rejected (and halved) if the tangent turns by more than this (radians).
    detect, critical : bool
        Detect and locate bifurcations; compute their critical data (eigenvectors, coefficients,
        sensitivities).
    locate_tol : float
        Absolute tolerance of the root-finder in pseudo-arclength (bounds the error in ``p``).

    Returns
    -------
    Branch
        ``status``: ``CONVERGED`` when the branch left the window, ``MAX_ITERATIONS`` after
        ``max_steps``, ``PARTIAL`` when the step size fell below ``ds_min`` (with the reason in
        ``message`` and the points so far), ``FAILED`` when the start did not converge.

    Examples
    --------
    >>> import torch
    >>> br = continuation(lambda x, p: p - x**2, torch.tensor([1.0], dtype=torch.float64), 1.0,
    ...                   (-1.0, 2.0), direction=-1, max_steps=200)
    >>> [b.kind for b in br.bifurcations], abs(br.bifurcations[0].p) < 1e-12
    (['fold'], True)
    """
    lo, hi = (float(v) for v in p_span)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"expected a parameter window lo < hi, got {p_span}")
    if direction not in (1, -1):
        raise ValueError(f"expected direction +1 or -1, got {direction}")
    if not isinstance(f, System) and hasattr(f, "rhs") and param is None:
        raise ValueError(
            "continuing a model needs param= ('gain', 'input', a parameter name or "
            "a callable); see system_from_model"
        )
    x0_t = None if x0 is None else torch.as_tensor(x0)
    system = as_system(f, kind=kind, n=None if x0_t is None else int(x0_t.numel()), p0=None, param=param, u=u)
    if kind is not None and kind != system.kind:
        raise ValueError(f"kind={kind!r} given, but the system is a {system.kind}")
    if p0 is None:
        if system.p0 is None:
            raise ValueError("no starting parameter: pass p0")
        p0 = system.p0
    p0 = float(p0)
    if not lo <= p0 <= hi:
        raise ValueError(f"the starting parameter p0={p0} lies outside the window {(lo, hi)}")
    if x0_t is None:
        raise ValueError("continuation needs a starting state x0 (e.g. from find_fixed_points)")
    x0_t = system.state(x0_t.reshape(-1) if x0_t.numel() == system.n else x0_t)
    L = hi - lo
    ds = 0.02 * L if ds is None else float(ds)
    ds_min = min(1e-9 * L, ds) if ds_min is None else float(ds_min)
    ds_max = max(0.1 * L, ds) if ds_max is None else float(ds_max)
    if not 0 < ds_min <= ds <= ds_max:
        raise ValueError(f"expected 0 < ds_min <= ds <= ds_max, got {ds_min}, {ds}, {ds_max}")

    config = {
        "p_span": [lo, hi],
        "ds": ds,
        "ds_min": ds_min,
        "ds_max": ds_max,
        "max_steps": int(max_steps),
        "direction": int(direction),
        "tol": float(tol),
        "locate_tol": float(locate_tol),
    }
    tracer = Tracer(system, tol=tol, max_newton=max_newton)
    n = system.n
    # ---- start: Newton at fixed p0, then the initial tangent (null vector of [G_x, G_p])
    y0 = torch.cat([x0_t, system.scalar(p0).reshape(1)])
    e_p = torch.zeros(n + 1, dtype=system.dtype, device=system.device)
    e_p[-1] = 1.0
    try:
        y0, _ = tracer.correct(y0, e_p, y0.clone(), 0.0, polish=True)
    except CorrectorError as exc:
        return _branch(
            system,
            [],
            [],
            Status.FAILED,
            f"the start (x0, p0={p0}) is not near a fixed point: {exc}",
            0,
            config,
        )
    Gy = system.residual_jacobian(y0)
    t0 = svd(Gy)[2][-1]
    if float(t0[-1]) * direction < 0 or (abs(float(t0[-1])) < 1e-12 and float(t0.sum()) < 0):
        t0 = -t0
    pts = [tracer.analyse(y0, t0)]
    bifs: list[Bifurcation] = []
    status, message, steps = Status.MAX_ITERATIONS, f"stopped after max_steps={max_steps}", 0
    cos_max = math.cos(max_angle)
    b: Point | None  # None where pinning the last step to the window's edge fails
    while steps < max_steps:
        a = pts[-1]
        try:
            y, iters = tracer.correct(a.y + ds * a.t, a.t, a.y, ds, max_dist=2 * ds + 10 * tol)
            b = tracer.analyse(y, a.t, ds)
            if float(a.t @ b.t) < cos_max and ds > 2 * ds_min:
                raise CorrectorError("the tangent turned too far in one step")
        except CorrectorError as exc:
            ds *= 0.5
            if ds < ds_min:
                status, message = Status.PARTIAL, f"step size fell below ds_min={ds_min:g}: {exc}"
                break
            continue
        steps += 1
        p_new = float(b.y[-1])
        leaving = not lo <= p_new <= hi
        if leaving:
            b = _pin_to_boundary(tracer, a, b, hi if p_new > hi else lo)
        if detect:
            bifs.extend(_events(tracer, a, b, len(pts) - 1, critical, locate_tol))
        if b is not None:
            pts.append(b)
        if leaving:
            status, message = Status.CONVERGED, "left the parameter window"
            break
        ds = min(ds * 1.5, ds_max) if iters <= 3 else (ds * 0.5 if iters >= 6 else ds)
        ds = max(ds, ds_min)
    return _branch(system, pts, bifs, status, message, steps, config)


def _pin_to_boundary(tracer: Tracer, a: Point, b: Point, p_b: float) -> Point | None:
    """The point of the step ``a → b`` at ``p = p_b`` (natural-parameter Newton), or None."""
    pa, pb = float(a.y[-1]), float(b.y[-1])
    frac = (p_b - pa) / (pb - pa)
    guess = a.y + frac * (b.y - a.y)
    guess[-1] = p_b
    e_p = torch.zeros_like(a.y)
    e_p[-1] = 1.0
    try:
        y, _ = tracer.correct(guess, e_p, guess.clone(), 0.0, polish=True)
        sigma = float(a.t @ (y - a.y))
        if sigma <= 0:
            return None
        # re-express the point on a's pseudo-arclength hyperplane for event location
        y, _ = tracer.correct(y, a.t, a.y, sigma, polish=True)
        return tracer.analyse(y, a.t, sigma)
    except CorrectorError:
        return None


def _events(
    tracer: Tracer, a: Point, b: Point | None, index: int, critical: bool, xtol: float
) -> list[Bifurcation]:
    if b is None:
        return []
    a = Point(**{**a.__dict__, "sigma": 0.0})
    out = []
    for lo, hi in find_events(tracer, a, a, b):
        for bif in leaf_kinds(lo, hi, tracer.system.kind):
            try:
                q, psi, acc = locate(tracer, a, lo, hi, bif, xtol=xtol)
            except CorrectorError:
                continue
            if bif == "branch_point":
                q, psi, acc = _refine_bp(tracer, a, q, psi, acc)
            out.append(_bifurcation(tracer.system, q, bif, psi, acc, index, a, b, critical))
    return out


def _refine_bp(tracer: Tracer, root: Point, q: Point, psi: float, acc: float):
    """Polish a bracketed branch point with the extended system (keeps ``q`` if that fails)."""
    try:
        y, step = refine_branch_point(tracer, q.y)
    except CorrectorError:
        return q, psi, acc
    if float((y - q.y).abs().max()) > 10 * max(acc, 1e-6) + 1e-8:
        return q, psi, acc  # converged to another point: keep the bracketed one
    point = tracer.analyse(y, root.t, float(root.t @ (y - root.y)))
    return point, psi_function(tracer.system.kind, "branch_point", root)(point), max(step, 1e-15)


def _bifurcation(
    system: System, q: Point, bif: str, psi: float, acc: float, index: int, a: Point, b: Point, critical: bool
) -> Bifurcation:
    x, p = q.y[:-1].clone(), float(q.y[-1])
    if critical:
        data = critical_data(system, x, p, bif)
    else:
        data = {
            "eigenvalue": critical_eigenvalue(q.eigs, system.kind, bif),
            "eigenvalues": q.eigs,
            "v": torch.zeros(0),
            "w": torch.zeros(0),
            "coefficients": {},
            "sensitivities": {},
            "eigenvalue_dp": None,
            "g": torch.zeros(0, 0),
            "param_names": [],
            "param_numels": [],
        }
    return Bifurcation(
        kind=bif,
        p=p,
        x=x,
        residual=q.residual,
        test_value=float(psi),
        p_accuracy=float(acc),
        index=int(index),
        n_unstable_before=a.n_unstable,
        n_unstable_after=b.n_unstable,
        **data,
    )


def _branch(
    system: System, pts: list[Point], bifs: list, status: Status, message: str, steps: int, config: dict
) -> Branch:
    n, k = system.n, min(system.n, _LEADING)
    if not pts:
        return Branch(
            points=torch.zeros(0, n, dtype=system.dtype),
            p=torch.zeros(0, dtype=system.dtype),
            stable=torch.zeros(0, dtype=torch.bool),
            n_unstable=torch.zeros(0, dtype=torch.long),
            leading_eigenvalues=torch.zeros(0, k, dtype=torch.complex128),
            tangents=torch.zeros(0, n + 1, dtype=system.dtype),
            bifurcations=[],
            kind=system.kind,
            status=status,
            message=message,
            num_steps=steps,
            config=config,
            **euler_fields(torch.zeros(0, n), system.dt),
        )
    Y = torch.stack([q.y for q in pts])
    nu = torch.tensor([q.n_unstable for q in pts], dtype=torch.long)
    bifs = sorted(bifs, key=lambda bf: bf.index)
    return Branch(
        points=Y[:, :-1].clone(),
        p=Y[:, -1].clone(),
        stable=nu == 0,
        n_unstable=nu,
        leading_eigenvalues=torch.stack([q.eigs[:k] for q in pts]).to(torch.complex128),
        tangents=torch.stack([q.t for q in pts]),
        bifurcations=bifs,
        kind=system.kind,
        status=status,
        message=message,
        num_steps=steps,
        config=config,
        **euler_fields(torch.stack([q.eigs for q in pts]), system.dt),
    )
