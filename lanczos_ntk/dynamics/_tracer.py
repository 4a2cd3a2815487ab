"""Corrector, point analysis and bifurcation location along a branch (internal).

A branch point is ``y = (x, p) ∈ R^{n+1}`` with ``G(y) = 0``. Points between two accepted
points ``a`` and ``b`` are parametrised by ``σ``, the pseudo-arclength along ``a``'s tangent:
``t_aᵀ (y - y_a) = σ`` (Keller 1977), so every test function becomes a scalar function of ``σ``
on ``[0, t_aᵀ(y_b - y_a)]``, and bifurcations are located by Brent's method on it.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._critical import criticality, eigen_counts, is_complex, sort_eigenvalues
from ._dense import eigvals, slogdet, solve, svd

__all__ = ["Point", "Tracer"]


@dataclasses.dataclass
class Point:
    """An analysed point on a branch (internal)."""

    y: torch.Tensor
    t: torch.Tensor
    eigs: torch.Tensor
    counts: tuple
    bp_sign: float
    bp_log: float
    flip_sign: float
    flip_log: float
    residual: float
    sigma: float = 0.0

    @property
    def n_unstable(self) -> int:
        return int(sum(self.counts))


class CorrectorError(RuntimeError):
    """Newton's method on the bordered system could not converge (internal)."""


class Tracer:
    """Newton corrector and analysis of points for one system (internal)."""

    def __init__(self, system, tol: float = 1e-10, max_newton: int = 10):
        self.system = system
        self.n = system.n
        self.tol = float(tol)
        self.max_newton = int(max_newton)
        self.evaluations = 0

    def residual(self, y: torch.Tensor) -> torch.Tensor:
        self.evaluations += 1
        return self.system.residual(y[:-1], y[-1])

    def correct(
        self,
        y: torch.Tensor,
        t_ref: torch.Tensor,
        y_ref: torch.Tensor,
        sigma: float,
        polish: bool = False,
        max_dist: float | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Solve ``G(y) = 0``, ``t_refᵀ (y - y_ref) = σ`` by Newton; raise CorrectorError."""
        y0 = y
        step_tol = math.sqrt(self.tol)
        for it in range(1, self.max_newton + 1):
            G = self.residual(y)
            if not bool(torch.isfinite(G).all()):
                raise CorrectorError("f returned non-finite values")
            H = torch.cat([G, (t_ref @ (y - y_ref) - sigma).reshape(1)])
            h_max = float(H.abs().max())
            if h_max <= 1e-15 * (1.0 + float(y.abs().max())):
                return y, it  # already exact (e.g. a guess on a trivial branch)
            M = torch.cat([self.system.residual_jacobian(y), t_ref[None]])
            if not bool(torch.isfinite(M).all()):
                raise CorrectorError("the Jacobian of f has non-finite entries")
            try:
                dy = solve(M, H)
            except RuntimeError:  # singular bordered Jacobian
                dy = None
            if dy is None or not bool(torch.isfinite(dy).all()):
                if h_max <= self.tol:
                    return y, it
                raise CorrectorError("singular bordered Jacobian [[G_x, G_p], [tᵀ]]")
            y = y - dy
            if max_dist is not None and float(torch.linalg.vector_norm(y - y0)) > max_dist:
                raise CorrectorError("Newton moved too far from the predictor")
            small = float(dy.abs().max()) <= step_tol * (1.0 + float(y.abs().max()))
            if small:
                if polish and float(dy.abs().max()) > 1e-14 * (1.0 + float(y.abs().max())):
                    polish = False  # one more step, then accept
                    continue
                res = float(self.residual(y).abs().max())
                if math.isfinite(res) and res <= self.tol:
                    return y, it
        raise CorrectorError(
            f"Newton did not converge in {self.max_newton} iterations "
            f"(residual {float(self.residual(y).abs().max()):.3g})"
        )

    def tangent(self, Gy: torch.Tensor, t_ref: torch.Tensor) -> torch.Tensor:
        """Unit tangent from ``[[G_y], [t_refᵀ]] t = e_{n+1}`` (keeps the orientation of ``t_ref``)."""
        M = torch.cat([Gy, t_ref[None]])
        e = torch.zeros(self.n + 1, dtype=Gy.dtype, device=Gy.device)
        e[-1] = 1.0
        try:
            t = solve(M, e)
        except RuntimeError:
            t = None
        if t is None or not bool(torch.isfinite(t).all()):
            t = svd(Gy)[2][-1]
            if float(t @ t_ref) < 0:
                t = -t
        return t / torch.linalg.vector_norm(t)

    def analyse(self, y: torch.Tensor, t_ref: torch.Tensor, sigma: float = 0.0) -> Point:
        """Tangent, eigenvalues, class counts and determinant signs at a corrected point."""
        system, n = self.system, self.n
        Gy = system.residual_jacobian(y)
        t = self.tangent(Gy, t_ref)
        sgn, logabs = slogdet(torch.cat([Gy, t[None]]))
        A = Gy[:, :n]
        if system.kind == "map":
            A = A + torch.eye(n, dtype=A.dtype, device=A.device)
            flip_sign, flip_log = slogdet(A + torch.eye(n, dtype=A.dtype, device=A.device))
        else:
            flip_sign, flip_log = 1.0, 0.0
        eigs = sort_eigenvalues(eigvals(A), system.kind)
        res = float(self.residual(y).abs().max())
        return Point(
            y=y,
            t=t,
            eigs=eigs,
            counts=eigen_counts(eigs, system.kind),
            bp_sign=float(sgn),
            bp_log=float(logabs),
            flip_sign=flip_sign,
            flip_log=flip_log,
            residual=res,
            sigma=sigma,
        )

    # ------------------------------------------------------------------ segments
    def point_between(self, root: Point, a: Point, b: Point, sigma: float) -> Point:
        """Corrected, analysed point at pseudo-arclength ``σ`` from ``root`` (between ``a``, ``b``).

        ``σ`` is measured along ``root``'s tangent; the Newton guess interpolates ``a`` and ``b``.
        """
        width = b.sigma - a.sigma
        frac = (sigma - a.sigma) / width if width != 0 else 0.0
        guess = a.y + frac * (b.y - a.y)
        y, _ = self.correct(guess, root.t, root.y, sigma, polish=True)
        return self.analyse(y, root.t, sigma)


# ---------------------------------------------------------------------- event detection
def _sign_flip(s1: float, s2: float) -> bool:
    return s1 * s2 < 0


def indicators(a: Point, b: Point, kind: str) -> dict:
    """Which test functions change between two points."""
    out = {}
    if _sign_flip(float(a.t[-1]), float(b.t[-1])):
        out["fold"] = True
    if _sign_flip(a.bp_sign, b.bp_sign):
        out["branch_point"] = True
    if kind == "map" and _sign_flip(a.flip_sign, b.flip_sign):
        out["flip"] = True
    return out


def _complex_delta(a: Point, b: Point) -> int:
    return b.counts[-1] - a.counts[-1]


def _simple(a: Point, b: Point, kind: str) -> bool | None:
    """True if the segment holds one event, None if it holds none, False if it must be split."""
    flips = indicators(a, b, kind)
    delta = [y - x for x, y in zip(a.counts, b.counts)]
    total = sum(abs(d) for d in delta)
    if not flips and total == 0:
        return None
    if len(flips) == 1 and total <= 1:
        return True
    if not flips and all(d == 0 for d in delta[:-1]) and abs(delta[-1]) == 2:
        return True
    return False


def find_events(
    tracer: Tracer, root: Point, a: Point, b: Point, max_depth: int = 8
) -> list[tuple[Point, Point]]:
    """Split ``[a, b]`` (a piece of the step from ``root``) until each piece holds one event."""
    kind = tracer.system.kind
    state = _simple(a, b, kind)
    if state is None:
        # possibly eigenvalues colliding off the critical line: no bifurcation
        return []
    if state or max_depth == 0:
        return [(a, b)]
    try:
        m = tracer.point_between(root, a, b, 0.5 * (a.sigma + b.sigma))
    except CorrectorError:
        return [(a, b)]
    return find_events(tracer, root, a, m, max_depth - 1) + find_events(tracer, root, m, b, max_depth - 1)


def leaf_kinds(a: Point, b: Point, kind: str) -> list[str]:
    """Bifurcation types in a segment that holds (at most) one event of each type."""
    flips = indicators(a, b, kind)
    out = [k for k in ("fold", "branch_point", "flip") if k in flips]
    dc = _complex_delta(a, b)
    if dc != 0 and b.n_unstable != a.n_unstable:
        out.append("hopf" if kind == "flow" else "neimark_sacker")
    return out


def psi_function(kind_system: str, bif: str, ref: Point):
    """Continuous test function ``ψ(point)`` whose simple root is the bifurcation."""
    if bif == "fold":
        return lambda q: float(q.t[-1])
    if bif == "branch_point":
        return lambda q: q.bp_sign * math.exp(min(q.bp_log - ref.bp_log, 700.0))
    if bif == "flip":
        return lambda q: q.flip_sign * math.exp(min(q.flip_log - ref.flip_log, 700.0))

    def psi(q):
        eigs = q.eigs
        sel = is_complex(eigs) & (eigs.imag > 0)
        cand = eigs[sel] if bool(sel.any()) else eigs
        d = criticality(cand, kind_system)
        return float(d[int(torch.argmin(d.abs()))])

    return psi


def _indicator(bif: str, q: Point):
    if bif == "fold":
        return float(q.t[-1]) > 0
    if bif == "branch_point":
        return q.bp_sign > 0
    if bif == "flip":
        return q.flip_sign > 0
    return q.counts


def locate(
    tracer: Tracer, root: Point, a: Point, b: Point, bif: str, xtol: float = 1e-13
) -> tuple[Point, float, float]:
    """Root of the test function of ``bif`` on ``[a, b]``: (point, test value, p accuracy)."""
    psi = psi_function(tracer.system.kind, bif, a)
    cache: dict[float, Point] = {a.sigma: a, b.sigma: b}

    def at(s: float) -> Point:
        if s not in cache:
            cache[s] = tracer.point_between(root, a, b, s)
        return cache[s]

    fa, fb = psi(a), psi(b)
    if fa == 0.0:
        return a, 0.0, 0.0
    if fb == 0.0:
        return b, 0.0, 0.0
    if fa * fb < 0:
        from scipy.optimize import brentq  # deferred: SciPy's optimize is slow to import

        try:
            s = brentq(lambda s: psi(at(s)), a.sigma, b.sigma, xtol=xtol, rtol=1e-15, maxiter=100)
            q = at(s)
            if abs(psi(q)) <= 1e-6 * max(1.0, abs(fa), abs(fb)):  # not a jump of ψ
                return q, psi(q), 2 * xtol
        except (RuntimeError, ValueError, CorrectorError):
            pass
    # fallback: bisection on the sign / count indicator
    lo, hi = a, b
    ind_lo = _indicator(bif, lo)
    for _ in range(60):
        if hi.sigma - lo.sigma <= xtol:
            break
        try:
            m = at(0.5 * (lo.sigma + hi.sigma))
        except CorrectorError:
            break
        if _indicator(bif, m) == ind_lo:
            lo = m
        else:
            hi = m
    q = lo if abs(psi(lo)) <= abs(psi(hi)) else hi
    return q, psi(q), abs(float(hi.y[-1] - lo.y[-1]))


def refine_branch_point(tracer: Tracer, y: torch.Tensor, max_iter: int = 12) -> tuple[torch.Tensor, float]:
    r"""Newton on the regular extended system of a simple branch point (internal).

    Unknowns ``(y, φ, β)``, equations ``G(y) + β φ = 0``, ``G_y(y)ᵀ φ = 0``, ``φᵀφ = 1``
    (``2n + 2`` of each; Moore 1980, Keller 1977). Points on the branch very
    near a branch point are ill-conditioned (Newton there may land on the crossing branch), so
    the bracketing gives ``y`` to a few digits and this system, regular at a simple branch point,
    gives it to full precision. Returns ``(y, |Δp|)`` of the last step; raises CorrectorError.
    """
    system, n = tracer.system, tracer.n
    Gy = system.residual_jacobian(y)
    U = svd(Gy)[0]
    phi = U[:, -1].to(y.dtype)
    beta = torch.zeros((), dtype=y.dtype)

    def gty(yy, ph):
        return vjp_residual(system, yy, ph)

    last = float("inf")
    for _ in range(max_iter):
        Gy = system.residual_jacobian(y)
        G = system.residual(y[:-1], y[-1])
        F = torch.cat([G + beta * phi, Gy.T @ phi, (phi @ phi - 1).reshape(1)])
        if not bool(torch.isfinite(F).all()):
            raise CorrectorError("non-finite values in the branch-point system")
        H = _jacobian_of(lambda yy, ph=phi: gty(yy, ph), y)  # (n+1) × (n+1): φᵀ G_yy
        J = torch.zeros(2 * n + 2, 2 * n + 2, dtype=y.dtype)
        J[:n, : n + 1] = Gy
        J[:n, n + 1 : 2 * n + 1] = beta * torch.eye(n, dtype=y.dtype)
        J[:n, -1] = phi
        J[n : 2 * n + 1, : n + 1] = H
        J[n : 2 * n + 1, n + 1 : 2 * n + 1] = Gy.T
        J[-1, n + 1 : 2 * n + 1] = 2 * phi
        try:
            dz = solve(J, F)
        except RuntimeError as exc:
            raise CorrectorError("singular branch-point system") from exc
        y = y - dz[: n + 1]
        phi = phi - dz[n + 1 : 2 * n + 1]
        beta = beta - dz[-1]
        last = abs(float(dz[n]))
        if float(dz.abs().max()) <= 1e-14 * (1.0 + float(y.abs().max())):
            break
    res = float(system.residual(y[:-1], y[-1]).abs().max())
    if not (math.isfinite(res) and res <= tracer.tol and abs(float(beta)) <= 1e-8):
        raise CorrectorError(f"the branch-point system did not converge (residual {res:.3g})")
    return y, last


def vjp_residual(system, y: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """``G_y(y)ᵀ φ`` by one reverse-mode product."""
    pull = torch.func.vjp(lambda yy: system.residual(yy[:-1], yy[-1]), y)[1]
    return pull(phi)[0]


def _jacobian_of(fn, y):
    return torch.func.jacfwd(fn)(y)
