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
- eigenvalue sensitivity ``∂λ/∂θ = wᴴ (∂A/∂θ) v / (wᴴ v)`` at fixed ``x``;
- critical parameter direction ``g = (∂f/∂θ)ᵀ w``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.func import jacrev, jvp, vjp

from ._dense import eigvals, solve, svd

__all__ = ["critical_data", "eigen_counts", "eigvals", "sort_eigenvalues"]

IMAG_TOL = 1e-10


def criticality(eigs: torch.Tensor, kind: str) -> torch.Tensor:
    """Signed distance to the stability boundary: ``Re λ`` (flow) or ``|μ| - 1`` (map)."""
    return eigs.real if kind == "flow" else eigs.abs() - 1.0


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
    return (int((unstable & ~cplx & pos).sum()), int((unstable & ~cplx & ~pos).sum()),
            int((unstable & cplx).sum()))


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
    out = 0
    for cu, ur in _real_parts(u):
        for cv, vr in _real_parts(v):
            out = out + (cu * cv) * _d2(f, x, ur, vr).to(cdt)
    return out


def trilinear(f, x, u, v, w) -> torch.Tensor:
    """``C(u, v, w) = D³f(x)[u, v, w]`` for real or complex arguments."""
    cdt = torch.complex128 if any(t.is_complex() for t in (u, v, w)) else x.dtype
    out = 0
    for cu, ur in _real_parts(u):
        for cv, vr in _real_parts(v):
            for cw, wr in _real_parts(w):
                out = out + (cu * cv * cw) * _d3(f, x, ur, vr, wr).to(cdt)
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


def _sensitivities(system, x, p, v, w) -> tuple[dict, complex, torch.Tensor, list, list]:
    """``∂λ/∂θ`` (at fixed x), ``∂λ/∂p``, and ``g = (∂f/∂θ)ᵀ w`` flattened."""
    vr = [(c, t.to(x.dtype)) for c, t in _real_parts(v)]
    wr = [(c, t.to(x.dtype)) for c, t in _real_parts(w)]
    norm = complex(w.to(torch.complex128).conj() @ v.to(torch.complex128))

    def form(fun):
        # wᴴ (∂fun/∂x) v as a complex number built from real jvps; fun(x) -> [n]
        def val(*args):
            out = []
            for cv, vv in vr:
                jv = jvp(lambda xx: fun(xx, *args), (x,), (vv,))[1]
                for cw, ww in wr:
                    out.append((complex(cv) * complex(cw).conjugate(), ww @ jv))
            return out
        return val

    sens: dict[str, torch.Tensor] = {}
    pt = system.scalar(p)
    real = not (v.is_complex() or w.is_complex())
    out_dtype = x.dtype if real else torch.complex128

    def finish(z):
        z = z / norm
        return z.real.to(out_dtype) if real else z.to(out_dtype)

    terms = form(lambda xx, pp: system.f(xx, pp))
    coeffs_p = [c for c, _ in terms(pt)]
    dp = jacrev(lambda pp: torch.stack([t for _, t in terms(pp)]))(pt)
    dlam_dp = complex(finish(sum(c * dp[i].to(torch.complex128) for i, c in enumerate(coeffs_p))))
    names: list[str] = []
    numels: list[int] = []
    g = torch.zeros(len(wr), 0, dtype=x.dtype)
    if system.has_params:
        params = system.params_at(p)
        names = list(params)
        numels = [int(t.numel()) for t in params.values()]
        fth = form(lambda xx, th: system.f_params(xx, pt, th))
        coeffs = [c for c, _ in fth(params)]

        def stacked(th):
            return torch.stack([t for _, t in fth(th)])

        jac = jacrev(stacked)(params)
        for k, J in jac.items():
            sens[k] = finish(sum(c * J[i].to(torch.complex128) for i, c in enumerate(coeffs)))
        _, pull = vjp(lambda th: system.f_params(x, pt, th), params)
        rows = []
        for _, ww in wr:
            grads = pull(ww)[0]
            rows.append(torch.cat([grads[k].reshape(-1) for k in names]))
        g = torch.stack(rows)
    return sens, dlam_dp, g, names, numels


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
        (``∂λ/∂θ`` at fixed ``x`` per model parameter), ``eigenvalue_dp``, ``g`` (``[k, P]``,
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
    sens, dlam_dp, g, names, numels = _sensitivities(system, x, p, v, w)
    return {"eigenvalue": lam, "eigenvalues": eigs, "v": v, "w": w, "coefficients": coeffs,
            "sensitivities": sens, "eigenvalue_dp": dlam_dp, "g": g, "param_names": names,
            "param_numels": numels}

