r"""Spectra of fixed points and the critical data of a bifurcation.

Stability is read from the eigenvalues of ``A = ∂f/∂x``: a flow is stable when every
``Re λ < 0``, a map when every ``|μ| < 1``. Changes are counted per class of eigenvalue (real /
complex; for maps real positive / real negative / complex), never from determinants of large
matrices, so crossings stay visible with hundreds of eigenvalues near the critical line.

Critical data at a bifurcation (Kuznetsov, *Elements of Applied Bifurcation Theory*, 3rd ed.,
2004, §3.5 and §5.4 for the multilinear-form formulas):

- right / left eigenvectors ``A v = λ v``, ``wᴴ A = λ wᴴ``, ``‖v‖ = 1``, ``wᴴ v = 1``;
- multilinear forms ``B(u, v) = D²f[u, v]``, ``C(u, v, w) = D³f[u, v, w]`` by nested ``jvp``;
- fold / branch point ``a = ½ wᴴ B(v, v)``;
- Hopf ``l₁ = 1/(2ω) Re[wᴴC(v,v,v̄) - 2 wᴴB(v, A⁻¹B(v,v̄)) + wᴴB(v̄, (2iω - A)⁻¹B(v,v))]``;
- flip ``c = ⅙ wᴴ[C(v,v,v) + 3 B(v, (I - A)⁻¹ B(v,v))]``;
- Neimark–Sacker ``d = ½ Re{e^{-iθ} wᴴ[C(v,v,v̄) + 2B(v,(I - A)⁻¹B(v,v̄)) + B(v̄,(e^{2iθ} - A)⁻¹B(v,v))]}``;
- eigenvalue sensitivity ``∂λ/∂θ = wᴴ (∂A/∂θ) v / (wᴴ v)`` at fixed ``x`` (partial), and
  along the branch of fixed points (total, implicit function theorem):
  ``dλ/dθ = ∂λ/∂θ + (∂λ/∂x) dx*/dθ`` with ``dx*/dθ = -(A - cI)⁻¹ ∂f/∂θ`` (``c = 0`` for a flow,
  ``1`` for a map) and ``∂λ/∂x_j = wᴴ (∂A/∂x_j) v / (wᴴ v)``;
- critical parameter direction ``g = (∂f/∂θ)ᵀ w``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.func import jacrev, jvp, vjp

from .._tolerances import IMAG_TOL
from ._dense import eigvals, solve, svd

__all__ = ["critical_data", "eigen_counts", "eigenvalue_derivatives", "eigvals", "sort_eigenvalues"]


def criticality(eigs: torch.Tensor, kind: str) -> torch.Tensor:
    """Signed distance to the stability boundary: ``Re λ`` (flow) or ``|μ| - 1`` (map)."""
    return eigs.real if kind == "flow" else eigs.abs() - 1.0


def euler_fields(eigs: torch.Tensor, dt: float | None) -> dict:
    """``dt``, ``euler_max_multiplier = max |1 + dt λ|`` over the last axis of ``eigs`` and
    ``euler_stable`` (all ``|1 + dt λ| < 1``): the stability of the Euler map ``x ↦ x + dt f``
    that a simulated flow follows (all None without ``dt``).
    """
    if dt is None:
        return {"dt": None, "euler_max_multiplier": None, "euler_stable": None}
    if eigs.numel() == 0:
        top = torch.zeros(eigs.shape[:-1], dtype=torch.float64)
    else:
        top = (1.0 + dt * eigs.to(torch.complex128)).abs().amax(dim=-1)
    return {"dt": float(dt), "euler_max_multiplier": top, "euler_stable": top < 1.0}


def sort_eigenvalues(eigs: torch.Tensor, kind: str) -> torch.Tensor:
    """Most unstable first (decreasing ``Re λ`` or ``|μ|``; ties by imaginary part)."""
    d = criticality(eigs, kind).detach().cpu().numpy()
    order = np.lexsort((-eigs.imag.detach().cpu().numpy(), -d))
    return eigs[torch.from_numpy(order).to(eigs.device)]


def is_complex(eigs: torch.Tensor) -> torch.Tensor:
    return eigs.imag.abs() > IMAG_TOL * (1.0 + eigs.abs())


def eigen_counts(eigs: torch.Tensor, kind: str) -> tuple[int, ...]:
    """Unstable eigenvalues per class.

    Flow: ``(real, complex)`` with ``Re λ > 0``. Map: ``(real positive, real negative, complex)``
    with ``|μ| > 1``.
    """
    unstable = criticality(eigs, kind) > 0
    cplx = is_complex(eigs)
    if kind == "flow":
        return (int((unstable & ~cplx).sum()), int((unstable & cplx).sum()))
    pos = eigs.real > 0
    return (
        int((unstable & ~cplx & pos).sum()),
        int((unstable & ~cplx & ~pos).sum()),
        int((unstable & cplx).sum()),
    )


def critical_eigenvalue(eigs: torch.Tensor, kind: str, bif: str) -> complex:
    """The eigenvalue of ``A`` that is critical for a bifurcation of type ``bif``."""
    cplx = is_complex(eigs)
    if bif in ("fold", "branch_point"):
        target = 0.0 if kind == "flow" else 1.0
        cand = eigs[~cplx] if bool((~cplx).any()) else eigs
        dist = (cand - target).abs()
    elif bif == "flip":
        cand = eigs[~cplx] if bool((~cplx).any()) else eigs
        dist = (cand + 1.0).abs()
    else:
        sel = cplx & (eigs.imag > 0)
        cand = eigs[sel] if bool(sel.any()) else eigs[eigs.imag >= 0]
        dist = criticality(cand, kind).abs()
    lam = complex(cand[int(torch.argmin(dist))])
    if bif in ("fold", "branch_point", "flip"):
        lam = complex(lam.real, 0.0)
    return lam


# ---------------------------------------------------------------------- multilinear forms
def _real_parts(u: torch.Tensor) -> list[tuple[complex, torch.Tensor]]:
    if not u.is_complex():
        return [(1.0, u)]
    return [(1.0, u.real.contiguous()), (1j, u.imag.contiguous())]


def _d2(f, x, a, b):
    return jvp(lambda xx: jvp(f, (xx,), (a,))[1], (x,), (b,))[1]


def _d3(f, x, a, b, c):
    return jvp(lambda xx: _d2(f, xx, a, b), (x,), (c,))[1]


def bilinear(f, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``B(u, v) = D²f(x)[u, v]`` for real or complex ``u, v`` (multilinear expansion)."""
    cdt = torch.complex128 if (u.is_complex() or v.is_complex()) else x.dtype
    out: torch.Tensor | int = 0
    for cu, ur in _real_parts(u):
        for cv, vr in _real_parts(v):
            out = out + (cu * cv) * _d2(f, x, ur, vr).to(cdt)
    assert isinstance(out, torch.Tensor)  # _real_parts is never empty
    return out


def trilinear(f, x, u, v, w) -> torch.Tensor:
    """``C(u, v, w) = D³f(x)[u, v, w]`` for real or complex arguments."""
    cdt = torch.complex128 if any(t.is_complex() for t in (u, v, w)) else x.dtype
    out: torch.Tensor | int = 0
    for cu, ur in _real_parts(u):
        for cv, vr in _real_parts(v):
            for cw, wr in _real_parts(w):
                out = out + (cu * cv * cw) * _d3(f, x, ur, vr, wr).to(cdt)
    assert isinstance(out, torch.Tensor)  # _real_parts is never empty
    return out


# ---------------------------------------------------------------------- eigenvectors
def _normalise_v(v: torch.Tensor) -> torch.Tensor:
    v = v / torch.linalg.vector_norm(v)
    k = int(torch.argmax(v.abs()))
    return v * (v[k].abs() / v[k]) if v.is_complex() else v * torch.sign(v[k])


def critical_vectors(A: torch.Tensor, lam: complex, real: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Null vectors of ``A - λI``: right ``v`` (``‖v‖=1``) and left ``w`` (``wᴴ v = 1``)."""
    n = A.shape[0]
    M = A.to(torch.complex128) - lam * torch.eye(n, dtype=torch.complex128)
    U, _, Vh = svd(M)
    v = Vh[-1].conj()
    w = U[:, -1]
    if real:
        v = _real_dir(v)
        w = _real_dir(w)
    v = _normalise_v(v)
    w = w / (w.conj() @ v).conj()
    return v, w


def _real_dir(z: torch.Tensor) -> torch.Tensor:
    k = int(torch.argmax(z.abs()))
    z = z * (z[k].abs() / z[k])
    return z.real.contiguous()


# ---------------------------------------------------------------------- coefficients
def _coefficients(f, x, A, v, w, bif, lam) -> dict[str, float]:
    n = A.shape[0]
    I = torch.eye(n, dtype=torch.complex128)
    Ac = A.to(torch.complex128)

    def dot(a, b):  # ⟨a, b⟩ = aᴴ b
        return complex(a.to(torch.complex128).conj() @ b.to(torch.complex128))

    if bif in ("fold", "branch_point"):
        return {"a": 0.5 * dot(w, bilinear(f, x, v, v)).real}
    if bif == "flip":
        bvv = bilinear(f, x, v, v)
        h = solve(I - Ac, bvv.to(torch.complex128)).real.to(x.dtype)
        c = (dot(w, trilinear(f, x, v, v, v)) + 3 * dot(w, bilinear(f, x, v, h))) / 6.0
        return {"c": c.real}
    vb = v.conj()
    bqq = bilinear(f, x, v, v)
    bqqb = bilinear(f, x, v, vb)
    cqqqb = dot(w, trilinear(f, x, v, v, vb))
    if bif == "hopf":
        omega = lam.imag
        h11 = solve(Ac, bqqb)
        h20 = solve(2j * omega * I - Ac, bqq)
        val = cqqqb - 2 * dot(w, bilinear(f, x, v, h11)) + dot(w, bilinear(f, x, vb, h20))
        return {"l1": val.real / (2 * omega), "omega": omega}
    theta = math.atan2(lam.imag, lam.real)
    h11 = solve(I - Ac, bqqb)
    h20 = solve(complex(math.cos(2 * theta), math.sin(2 * theta)) * I - Ac, bqq)
    val = cqqqb + 2 * dot(w, bilinear(f, x, v, h11)) + dot(w, bilinear(f, x, vb, h20))
    e = complex(math.cos(theta), -math.sin(theta))
    return {"d": 0.5 * (e * val).real, "theta": theta}


def eigenvalue_derivatives(
    fun,
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    v: torch.Tensor,
    w: torch.Tensor,
    kind: str,
    *,
    total: bool = True,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    r"""Derivatives of an eigenvalue ``λ`` of ``A = ∂f/∂x`` with respect to the parameters.

    ``fun(x, params) -> [n]`` is the vector field (``kind="flow"``) or the map (``"map"``);
    ``v``, ``w`` the right and left eigenvectors of ``λ`` at the fixed point ``x``.

    Returns ``(partial, total)``, one complex128 tensor per parameter each:

    - ``partial``: ``∂λ/∂θ = wᴴ (∂A/∂θ) v / (wᴴ v)`` with ``x`` held fixed;
    - ``total``: ``dλ/dθ`` along the branch of fixed points through ``x`` (which moves with
      ``θ``): ``∂λ/∂θ - (∂f/∂θ)ᵀ z`` with ``(A - cI)ᵀ z = ∇_x λ``, ``∇_x λ = wᴴ (∂A/∂x_j) v /
      (wᴴ v)``, ``c = 0`` for a flow and ``1`` for a map. ``None`` where ``A - cI`` is singular
      and ``∇_x λ`` has a component along its left null space: at a fold or a transcritical
      branch point the branch turns or crosses another, and ``dλ/dθ`` does not exist (it grows
      like ``|θ - θ_c|^{-1/2}`` towards a fold).

    E.g. ``ẋ = μx - x³`` on the upper branch ``x* = √μ``: ``λ = -2μ``, partial ``∂λ/∂μ = 1``,
    total ``-2``; ``ẋ = μ - x²`` at ``x* = √μ``: partial ``0``, total ``-1/√μ``.
    ``total=False`` skips the total derivative (returned as ``None``).
    """
    x = x.detach()
    cplx = v.is_complex() or w.is_complex()
    vr, vi = (v.real, v.imag) if v.is_complex() else (v, torch.zeros_like(v))
    wr, wi = (w.real, w.imag) if w.is_complex() else (w, torch.zeros_like(w))
    vr, vi, wr, wi = (t.to(x.dtype) for t in (vr, vi, wr, wi))
    norm = complex(w.to(torch.complex128).conj() @ v.to(torch.complex128))

    def pairing(th, xx):  # wᴴ A(xx, θ) v as [real, imaginary], A v by forward mode
        Av_re = jvp(lambda y: fun(y, th), (xx,), (vr,))[1]
        Av_im = jvp(lambda y: fun(y, th), (xx,), (vi,))[1] if cplx else torch.zeros_like(Av_re)
        return torch.stack([wr @ Av_re + wi @ Av_im, wr @ Av_im - wi @ Av_re])

    d_th, d_x = jacrev(pairing, argnums=(0, 1))(params, x)

    def cx(t):  # [2, ...] -> complex, divided by wᴴ v
        return (t[0].to(torch.complex128) + 1j * t[1].to(torch.complex128)) / norm

    partial = {k: cx(t).detach() for k, t in d_th.items()}
    if not total:
        return partial, None
    grad_x = cx(d_x).detach()  # ∇_x λ, [n]
    A = jacrev(lambda y: fun(y, params))(x).detach().to(torch.float64)
    M = A - (1.0 if kind == "map" else 0.0) * torch.eye(A.shape[0], dtype=torch.float64)
    rhs = torch.stack([grad_x.real, grad_x.imag], dim=1)  # [n, 2]
    # Mᵀ z = ∇_x λ with M = U S Vᵀ: z = U S⁻¹ Vᵀ rhs on the singular values that are not
    # zero on the scale of A (or 1: the decay of a flow, the identity of a map); the
    # solution exists only if rhs has no component along the rest
    U, S, Vh = torch.linalg.svd(M)
    keep = S > 1e-10 * max(float(torch.linalg.matrix_norm(A, 2)), 1.0)
    coef = Vh @ rhs
    null = coef[~keep]
    if null.numel() and float(null.abs().max()) > 1e-8 * (float(rhs.abs().max()) + 1e-300):
        return partial, None
    z = U[:, keep] @ (coef[keep] / S[keep, None])
    pull = vjp(lambda th: fun(x, th), params)[1]
    re, im = pull(z[:, 0].to(x.dtype))[0], pull(z[:, 1].to(x.dtype))[0]
    total_d = {
        k: (partial[k] - (re[k].to(torch.complex128) + 1j * im[k].to(torch.complex128))).detach()
        for k in partial
    }
    return partial, total_d


def _sensitivities(system, x, p, v, w) -> dict:
    """``∂λ/∂θ`` (at fixed x) and ``dλ/dθ`` (along the branch), ``∂λ/∂p`` at fixed x, and
    ``g = (∂f/∂θ)ᵀ w`` flattened.
    """
    real = not (v.is_complex() or w.is_complex())
    out_dtype = x.dtype if real else torch.complex128

    def finish(d):
        if d is None:
            return None
        return {k: (t.real if real else t).to(out_dtype) for k, t in d.items()}

    pt = system.scalar(p)
    # ∂λ/∂p at fixed x: p as the one "parameter" of f(x, p)
    dp, _ = eigenvalue_derivatives(
        lambda xx, th: system.f(xx, th["p"]), x, {"p": pt}, v, w, system.kind, total=False
    )
    out: dict[str, Any] = {
        "sensitivities": {},
        "sensitivities_total": None,
        "eigenvalue_dp": complex(dp["p"]),
        "g": torch.zeros(1 if real else 2, 0, dtype=x.dtype),
        "param_names": [],
        "param_numels": [],
    }
    if not system.has_params:
        return out
    params = system.params_at(p)
    names = list(params)
    partial, total = eigenvalue_derivatives(
        lambda xx, th: system.f_params(xx, pt, th), x, params, v, w, system.kind
    )
    pull = vjp(lambda th: system.f_params(x, pt, th), params)[1]
    rows = []
    for _, ww in _real_parts(w):
        grads = pull(ww.to(x.dtype))[0]
        rows.append(torch.cat([grads[k].reshape(-1) for k in names]))
    out.update(
        sensitivities=finish(partial),
        sensitivities_total=finish(total),
        g=torch.stack(rows),
        param_names=names,
        param_numels=[int(t.numel()) for t in params.values()],
    )
    return out


def critical_data(system, x: torch.Tensor, p: float, bif: str) -> dict:
    r"""Critical eigen-data, normal-form coefficient and sensitivities at ``(x, p)``.

    Parameters
    ----------
    system : System
        E.g. from :func:`system_from_model` (then sensitivities cover every model parameter).
    x : tensor ``[n]``, p : float
        The point (normally a located bifurcation; any fixed point works, the eigenvalue
        closest to the critical one for ``bif`` is used).
    bif : {"fold", "branch_point", "hopf", "flip", "neimark_sacker"}

    Returns
    -------
    dict
        ``eigenvalue``, ``eigenvalues``, ``v``, ``w`` (``‖v‖ = 1``, largest entry real positive,
        ``wᴴ v = 1``), ``coefficients`` (see :class:`Bifurcation`), ``sensitivities``
        (``∂λ/∂θ`` at fixed ``x`` per model parameter), ``sensitivities_total`` (``dλ/dθ``
        along the branch, see :func:`eigenvalue_derivatives`; ``None`` where it does not
        exist, as at a fold), ``eigenvalue_dp``, ``g`` (``[k, P]``,
        ``(∂f/∂θ)ᵀ w`` with ``k = 2`` rows for complex ``w``), ``param_names``, ``param_numels``.
    """
    if bif not in ("fold", "branch_point", "hopf", "flip", "neimark_sacker"):
        raise ValueError(f"unknown bifurcation kind {bif!r}")
    if system.kind == "flow" and bif in ("flip", "neimark_sacker"):
        raise ValueError(f"{bif!r} is a bifurcation of maps; this system is a flow")
    if system.kind == "map" and bif == "hopf":
        raise ValueError("'hopf' is a bifurcation of flows; use 'neimark_sacker' for maps")
    x = system.state(x)
    A = system.jacobian(x, p)
    eigs = sort_eigenvalues(eigvals(A), system.kind)
    lam = critical_eigenvalue(eigs, system.kind, bif)
    real = bif in ("fold", "branch_point", "flip")
    v, w = critical_vectors(A, lam, real)
    if real:
        v, w = v.to(x.dtype), w.to(x.dtype)
    pt = system.scalar(p)

    def f(xx):
        return system.f(xx, pt)

    coeffs = _coefficients(f, x, A, v, w, bif, lam)
    return {
        "eigenvalue": lam,
        "eigenvalues": eigs,
        "v": v,
        "w": w,
        "coefficients": coeffs,
        **_sensitivities(system, x, p, v, w),
    }
