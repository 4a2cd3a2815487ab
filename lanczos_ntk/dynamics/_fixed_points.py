r"""Fixed points from many seeds: minimise ``q(x) = ½‖G(x)‖²``, then Newton, then deduplicate.

Following Sussillo & Barak (2013), seeds are taken along trajectories of the system (or passed
in), and the speed ``q(x) = ½‖G(x)‖²`` (``G = f`` for a flow, ``f - x`` for a map) is minimised
for every seed at once. Here the minimisation is Levenberg–Marquardt (Gauss–Newton with an
adaptive damping per seed, Moré 1978), which behaves like gradient descent far from a root and
like Newton close to one; a few undamped Newton steps then polish the converged seeds. Jacobians
come from ``torch.func.jacfwd`` vmapped over the seeds.
"""

from __future__ import annotations

import torch
from torch.func import jacfwd, vmap

from .._results import Status
from .._tolerances import SAME_POINT_TOL
from ..linalg._common import default_generator
from ._critical import criticality, euler_fields, sort_eigenvalues
from ._dense import eigvals
from ._results import FixedPoints
from ._system import System, as_system, system_from_model

__all__ = ["find_fixed_points"]


def trajectory_seeds(
    system: System,
    p,
    num_seeds: int,
    generator: torch.Generator,
    *,
    scale: float = 1.0,
    num_steps: int = 100,
    dt: float = 0.1,
) -> torch.Tensor:
    """States along trajectories from random starts ``x ~ N(0, scale²)`` (``[num_seeds, n]``).

    Flows are integrated by explicit Euler with step ``dt``; maps are iterated. Every other
    trajectory contributes its state after a random number of steps in ``[1, num_steps]`` (these
    seeds find the attractors and the slow regions between them), the rest their random start
    (these also reach unstable fixed points, which trajectories leave).
    """
    x = scale * torch.randn(num_seeds, system.n, generator=generator, dtype=system.dtype)
    stops = torch.randint(1, num_steps + 1, (num_seeds,), generator=generator)
    stops[1::2] = 0
    p = system.scalar(p)
    fv = vmap(lambda xx: system.f(xx, p))
    out = x.clone()
    with torch.no_grad():
        for k in range(1, num_steps + 1):
            fx = fv(x)
            x = x + dt * fx if system.kind == "flow" else fx
            x = torch.where(torch.isfinite(x), x, out)
            out = torch.where((stops == k)[:, None], x, out)
    return out


def find_fixed_points(
    system,
    seeds: torch.Tensor | None = None,
    p: float | None = None,
    *,
    u: torch.Tensor | None = None,
    param=None,
    num_seeds: int = 64,
    generator: torch.Generator | None = None,
    seed_scale: float = 1.0,
    opt_steps: int = 100,
    newton_steps: int = 8,
    tol: float = 1e-10,
    dedup_tol: float = SAME_POINT_TOL,
    kind: str | None = None,
) -> FixedPoints:
    r"""Find the fixed points of a flow or map from many seeds at once.

    Parameters
    ----------
    system : System, model or callable
        A :class:`System`, a model of :mod:`lanczos_ntk.models` (held at the constant input
        ``u``), or ``f(x, p)`` (with ``seeds`` given, or ``kind`` and seeds drawn at random).
    seeds : tensor ``[S, n]``, optional
        Starting states. By default ``num_seeds`` states along trajectories from random starts
        ``N(0, seed_scale²)`` (Sussillo & Barak 2013).
    p : float, optional
        Parameter value (default: the system's ``p0``).
    u : tensor ``[d_in]`` or ``[K, d_in]``, optional
        For a model: the constant input, or ``K`` inputs searched one after the other (each
        batched over the seeds); ``input_index`` tells which input a point belongs to.
    param : optional
        For a model: the parameter ``p`` refers to (see :func:`system_from_model`).
    generator : torch.Generator, optional
        Randomness of the default seeds (a generator seeded with 0 if not given).
    opt_steps, newton_steps : int
        Levenberg–Marquardt steps on ``q``, then undamped Newton steps.
    tol : float
        A seed has converged when ``‖G(x)‖_∞ <= tol``.
    dedup_tol : float
        Points closer than ``dedup_tol · (1 + ‖x‖_∞)`` (max-norm) are merged.

    Returns
    -------
    FixedPoints
        Distinct points with residuals, eigenvalues (most unstable first), stability, counts.

    Examples
    --------
    >>> import torch
    >>> fp = find_fixed_points(lambda x, p: x - x**3, torch.linspace(-2, 2, 9)[:, None].double(),
    ...                        p=0.0)
    >>> sorted(round(float(v), 6) for v in fp.points[:, 0])
    [-1.0, 0.0, 1.0]
    """
    generator = default_generator(generator)
    if hasattr(system, "rhs") and hasattr(system, "kind") and u is not None:
        u_all = torch.as_tensor(u, dtype=torch.float64)
        if u_all.dim() == 2:
            results = [
                find_fixed_points(
                    system_from_model(system, param, uk),
                    seeds,
                    p,
                    num_seeds=num_seeds,
                    generator=generator,
                    seed_scale=seed_scale,
                    opt_steps=opt_steps,
                    newton_steps=newton_steps,
                    tol=tol,
                    dedup_tol=dedup_tol,
                )
                for uk in u_all
            ]
            return _concat(results)
    n = None
    if seeds is not None:
        seeds = torch.as_tensor(seeds)
        if seeds.dim() != 2:
            raise ValueError(f"expected seeds of shape [S, n], got {tuple(seeds.shape)}")
        n = int(seeds.shape[1])
    system = as_system(system, kind=kind, n=n, param=param, u=u)
    if p is None:
        p = system.p0 if system.p0 is not None else 0.0
    p_t = system.scalar(p)
    if seeds is None:
        seeds = trajectory_seeds(system, p_t, num_seeds, generator, scale=seed_scale)
    seeds = seeds.to(system.dtype)
    if seeds.shape[1] != system.n:
        raise ValueError(f"expected seeds with {system.n} columns, got {tuple(seeds.shape)}")
    X, res = _solve(system, seeds, p_t, opt_steps, newton_steps, tol)
    ok = res <= tol
    num_conv = int(ok.sum())
    X, res = X[ok], res[ok]
    pts, rs, counts = _dedup(X, res, dedup_tol)
    n_fin = int(torch.isfinite(seeds).all(dim=1).sum())
    if pts.shape[0] == 0:
        why = "no seed converged" if n_fin else "every seed was non-finite"
        message = (
            f"{why} to ‖G‖_∞ <= {tol:g} (best residual "
            f"{float(res.min()) if res.numel() else float('nan'):.3g}); try more seeds, "
            "a larger seed_scale or more opt_steps"
        )
        status = Status.FAILED
    else:
        message, status = (
            f"{pts.shape[0]} distinct fixed points from {num_conv} converged seeds",
            Status.CONVERGED,
        )
    eigs, stable, nun = _spectra(system, pts, p_t)
    F = pts.shape[0]
    return FixedPoints(
        points=pts,
        residuals=rs,
        eigenvalues=eigs,
        stable=stable,
        n_unstable=nun,
        counts=counts,
        input_index=torch.zeros(F, dtype=torch.long),
        p=float(p),
        kind=system.kind,
        num_seeds=int(seeds.shape[0]),
        num_converged=num_conv,
        status=status,
        message=message,
        config={
            "opt_steps": int(opt_steps),
            "newton_steps": int(newton_steps),
            "tol": float(tol),
            "dedup_tol": float(dedup_tol),
            "seed": int(generator.initial_seed()),
        },
        **euler_fields(eigs, system.dt),
    )


def _solve(
    system: System, X: torch.Tensor, p: torch.Tensor, opt_steps: int, newton_steps: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Levenberg–Marquardt on ``½‖G‖²`` then Newton; returns states and ``‖G‖_∞``."""

    def G(x):
        return system.residual(x, p)

    Gv = vmap(G)
    Jv = vmap(jacfwd(G))
    S, n = X.shape
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    finite = torch.isfinite(X).all(dim=1)
    X = torch.where(finite[:, None], X, torch.zeros_like(X))
    r = Gv(X)
    bad = ~torch.isfinite(r).all(dim=1) | ~finite
    cost = torch.where(bad, torch.full_like(r[:, 0], float("inf")), 0.5 * (r**2).sum(dim=1))
    lam = torch.full((S,), 1e-3, dtype=X.dtype, device=X.device)

    def jac(X):  # zeros where undefined, so LAPACK never sees NaN (those seeds are never updated)
        return torch.nan_to_num(Jv(X), nan=0.0, posinf=0.0, neginf=0.0)

    def clean(t):
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def solve(M, b):  # batched LU solve, least squares where a matrix is singular
        sol, info = torch.linalg.solve_ex(M, b.unsqueeze(-1))
        sol = sol.squeeze(-1)
        sing = (info != 0) | ~torch.isfinite(sol).all(dim=1)
        if bool(sing.any()):
            sol[sing] = torch.linalg.lstsq(M[sing], b[sing].unsqueeze(-1)).solution.squeeze(-1)
        return torch.nan_to_num(sol)

    r = clean(r)

    def active():  # seeds still worth iterating: defined, not converged, damping not at its cap
        return ~bad & (r.abs().amax(dim=1) > 1e-3 * tol) & (lam < 1e11)

    for _ in range(opt_steps):
        idx = torch.nonzero(active()).squeeze(-1)
        if idx.numel() == 0:
            break
        Xa, ra, la = X[idx], r[idx], lam[idx]
        J = jac(Xa)
        JtJ = J.transpose(1, 2) @ J
        g = clean((J.transpose(1, 2) @ ra.unsqueeze(-1)).squeeze(-1))
        scale = JtJ.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
        M = clean(JtJ + (la * scale)[:, None, None] * eye)
        Xn = Xa - solve(M, g)
        rn = Gv(Xn)
        cn = 0.5 * (rn**2).sum(dim=1)
        better = torch.isfinite(cn) & (cn < cost[idx])
        X[idx] = torch.where(better[:, None], Xn, Xa)
        r[idx] = torch.where(better[:, None], clean(rn), ra)
        cost[idx] = torch.where(better, cn, cost[idx])
        lam[idx] = torch.where(better, (la / 3).clamp_min(1e-12), (la * 4).clamp_max(1e12))
    lam.fill_(0.0)
    for _ in range(newton_steps):
        idx = torch.nonzero(active()).squeeze(-1)
        if idx.numel() == 0:
            break
        Xa, ra = X[idx], r[idx]
        Xn = Xa - solve(jac(Xa), ra)
        rn = Gv(Xn)
        better = torch.isfinite(rn).all(dim=1) & (rn.abs().amax(dim=1) < ra.abs().amax(dim=1))
        X[idx] = torch.where(better[:, None], Xn, Xa)
        r[idx] = torch.where(better[:, None], rn, ra)
        lam[idx] = torch.where(better, 0.0, 1e12).to(lam.dtype)  # stop seeds that stop improving
    res = torch.where(bad, torch.full_like(r[:, 0], float("inf")), r.abs().amax(dim=1))
    return X, torch.nan_to_num(res, nan=float("inf"))


def _dedup(X: torch.Tensor, res: torch.Tensor, tol: float):
    order = torch.argsort(res)
    keep: list[int] = []
    counts: list[int] = []
    for i in order.tolist():
        for j, k in enumerate(keep):
            if float((X[i] - X[k]).abs().max()) <= tol * (1.0 + float(X[k].abs().max())):
                counts[j] += 1
                break
        else:
            keep.append(i)
            counts.append(1)
    idx = torch.tensor(keep, dtype=torch.long)
    return X[idx], res[idx], torch.tensor(counts, dtype=torch.long)


def _spectra(system: System, pts: torch.Tensor, p: torch.Tensor):
    n = system.n
    if pts.shape[0] == 0:
        return (
            torch.zeros(0, n, dtype=torch.complex128),
            torch.zeros(0, dtype=torch.bool),
            torch.zeros(0, dtype=torch.long),
        )
    A = vmap(jacfwd(lambda x: system.f(x, p)))(pts)
    eigs = torch.stack([sort_eigenvalues(eigvals(a), system.kind) for a in A])
    nun = (criticality(eigs, system.kind) > 0).sum(dim=1)
    return eigs.to(torch.complex128), nun == 0, nun


def _concat(results: list[FixedPoints]) -> FixedPoints:
    idx = torch.cat([torch.full((len(r),), k, dtype=torch.long) for k, r in enumerate(results)])
    found = sum(len(r) for r in results)
    return FixedPoints(
        points=torch.cat([r.points for r in results]),
        residuals=torch.cat([r.residuals for r in results]),
        eigenvalues=torch.cat([r.eigenvalues for r in results]),
        stable=torch.cat([r.stable for r in results]),
        n_unstable=torch.cat([r.n_unstable for r in results]),
        counts=torch.cat([r.counts for r in results]),
        input_index=idx,
        p=results[0].p,
        kind=results[0].kind,
        num_seeds=sum(r.num_seeds for r in results),
        num_converged=sum(r.num_converged for r in results),
        status=Status.CONVERGED if found else Status.FAILED,
        message="; ".join(f"input {k}: {r.message}" for k, r in enumerate(results)),
        config=results[0].config,
        **euler_fields(torch.cat([r.eigenvalues for r in results]), results[0].dt),
    )
