"""Stochastic Lanczos quadrature and what it gives without new products: ``tr f``, traces,
spectral densities, effective ranks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .. import linalg
from .._results import Status
from .._tolerances import ZERO_RTOL
from ..linalg._common import mean_se
from ._coerce import _seed_of, _work_device, as_operator
from ._deflated import DeflatedSLQ, deflated_slq
from ._eigen import eigsh
from ._results import EffectiveRank, SLQResult, SpectralDensity, TraceResult


# ------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature and what follows from it
# ------------------------------------------------------------------------------------------
def slq(
    op: Any,
    num_probes: int = 32,
    num_steps: int = 80,
    *,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    side: str = "auto",
    reorthogonalize: bool | str = "auto",
) -> SLQResult:
    """Stochastic Lanczos quadrature of the spectral measure (Ubaru, Chen & Saad 2017).

    For each random probe ``v`` (Rademacher or Gaussian) ``num_steps`` Lanczos steps from
    ``v / ||v||`` give ``T = S diag(θ) Sᵀ``; the nodes ``θ_j`` and weights
    ``||v||² S_{1j}² / n`` form a Gauss quadrature with
    ``E[n Σ_j w_j f(θ_j)] ≈ tr f(A)`` (exact in expectation for polynomials of degree
    ``< 2 num_steps``). The probes run as one block: one operator call per step.

    Parameters
    ----------
    op :
        Any accepted operator form (see :func:`as_operator`).
    num_probes, num_steps : int
        Probes and Lanczos steps per probe (steps are capped at the dimension).
    probe : {"rademacher", "gaussian"}
    generator : torch.Generator, optional
        Default: seeded with 0.
    side : {"auto", "primal", "dual"}
    reorthogonalize : bool or "auto"
        Full reorthogonalisation per probe (memory ``8 n num_steps num_probes`` bytes); without
        it only the three-term recurrence runs (memory ``O(n num_probes)``; Gauss quadrature is
        robust to the loss of orthogonality, which only duplicates converged nodes and splits
        their weight). ``"auto"`` reorthogonalises when the basis fits in 1 GiB.

    Returns
    -------
    SLQResult
        Feed it to :func:`spectral_density`, :func:`tr_f`, :func:`trace_from_slq` or
        :func:`effective_rank`; none of them needs new products.

    Notes
    -----
    Cost: ``num_probes * num_steps`` products in ``num_steps`` operator calls.
    """
    if probe not in ("rademacher", "gaussian"):
        raise ValueError(f"expected probe='rademacher' or 'gaussian', got {probe!r}")
    for name, v in (("num_probes", num_probes), ("num_steps", num_steps)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"expected a positive integer {name}, got {v!r}")
    A = as_operator(op, side)
    gen, seed = _seed_of(generator)
    if reorthogonalize == "auto":
        reorthogonalize = 8 * A.n * min(num_steps, A.n) * num_probes <= 2**30
    elif not isinstance(reorthogonalize, bool):
        raise ValueError(f"expected reorthogonalize True, False or 'auto', got {reorthogonalize!r}")
    q = linalg.lanczos_quadrature(
        A.matmul,
        A.n,
        int(num_probes),
        int(num_steps),
        probe=probe,
        generator=gen,
        dtype=A.dtype,
        device=_work_device(A),
        reorthogonalize=reorthogonalize,
    )
    return SLQResult.from_quadrature(
        q,
        dimension=A.n,
        primal_dimension=A.primal_dimension,
        side=A.side,
        num_probes=num_probes,
        probe=probe,
        reorthogonalize=reorthogonalize,
        dtype=A.dtype,
        device=A.device,
        seed=seed,
    )


def _check_slq(result: Any):
    if not (isinstance(result, SLQResult) or _is_deflated(result)):
        raise TypeError(
            f"expected an SLQResult from lanczos_ntk.slq or a DeflatedSLQ from "
            f"lanczos_ntk.deflated_slq, got {type(result).__name__}"
        )
    return result


def _is_deflated(result: Any) -> bool:

    return isinstance(result, DeflatedSLQ)


_TOO_FEW_RTOL = 0.05  # a last-step change above 5% of the value: too few Lanczos steps


def _quad_status(change: float, value: float) -> Status:
    return Status.TOO_FEW_STEPS if change > _TOO_FEW_RTOL * abs(value) else Status.CONVERGED


def _combine(se: float, err: float) -> float:
    if math.isinf(err):
        return math.inf
    return math.hypot(se, err) if math.isfinite(se) else (err if err > 0 else se)


def tr_f(result: Any, f: Callable[[torch.Tensor], torch.Tensor], *, degree: int | None = None) -> TraceResult:
    """Estimate ``tr f(A)`` from an :class:`SLQResult` or a :class:`DeflatedSLQ`.

    ``tr f(A) ≈ exact + (1/s) Σ_p [n Σ_j w_pj f(θ_pj)]``: the exact part is ``(N - n) f(0)``
    for the structural zeros (plus ``Σ_i f(λ_i)`` over the deflated top of a
    :class:`DeflatedSLQ`), the bracket the per-probe quadrature. The standard error combines
    the spread of the bracket over probes (``std / sqrt(s)``) with the change of the estimate
    over the last Lanczos step (exact, 0, for a polynomial of ``degree < 2 m``; give ``degree``
    when ``f`` is one). ``f`` acts elementwise on a float64 tensor. No new products.

    Examples
    --------
    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> round(tr_f(slq(A, 4, 10), lambda x: x**2).estimate, 6)  # Rademacher on a diagonal
    385.0
    """
    result = _check_slq(result)
    est, se = mean_se(result.samples(f))
    est += result.exact_part(f)
    err = result.quadrature_change(f, degree)
    return TraceResult(
        estimate=est,
        standard_error=_combine(se, err),
        method=_method_of(result),
        num_matvecs=0,
        side=result.side,
        dimension=result.dimension,
        primal_dimension=result.primal_dimension,
        seed=result.seed,
        quadrature_error=err,
        status=_quad_status(err, est),
    )


def _method_of(result: Any) -> str:
    return "deflated-slq" if _is_deflated(result) else "slq"


def trace_from_slq(result: Any) -> TraceResult:
    """``tr A`` from an SLQ result (for Rademacher probes: Hutchinson with the same probes),
    never below the largest eigenvalue known (the top node, or the deflated ``λ_max``).
    """
    r = tr_f(result, lambda x: x, degree=1)
    floor = result.lambda_max if _is_deflated(result) else 0.0
    return dataclasses.replace(r, estimate=max(r.estimate, floor))


def _zero_cut(result: Any, zero_rtol: float) -> float:
    return zero_rtol * max(float(result.lambda_max), 0.0)


def _measure(result: Any) -> tuple[torch.Tensor, torch.Tensor, SLQResult]:
    """All nodes with their weights in eigenvalues per node, averaged over probes, plus the
    quadrature they come from (the remainder's for a deflated result): ``(x, w, quad)``.
    """
    if _is_deflated(result):
        rem = result.remainder
        x = torch.cat([result.top, rem.nodes.flatten()])
        w = torch.cat([torch.ones_like(result.top), (rem.weights * rem.dimension / rem.num_probes).flatten()])
        return x, w, rem
    return result.nodes.flatten(), (result.weights * result.dimension / result.num_probes).flatten(), result


def _count_bound(quad: SLQResult, cut: float) -> float:
    """Chebyshev–Markov–Stieltjes: the distribution function of probe ``p``'s measure at
    ``cut`` lies between the quadrature's count without and with the nodes bracketing ``cut``;
    return ``n`` times the mean over probes of the larger bracketing weight.
    """
    order = torch.argsort(quad.nodes, dim=1)
    nodes = torch.gather(quad.nodes, 1, order)
    weights = torch.gather(quad.weights, 1, order)
    m = nodes.shape[1]
    i = (nodes <= cut).sum(dim=1)  # nodes at or below the cut
    padded = torch.cat([torch.zeros_like(weights[:, :1]), weights, torch.zeros_like(weights[:, :1])], dim=1)
    rows = torch.arange(nodes.shape[0])
    below, above = padded[rows, i], padded[rows, torch.clamp(i + 1, max=m + 1)]
    return quad.dimension * float(torch.maximum(below, above).mean())


def spectral_density(
    result: Any,
    grid: torch.Tensor | None = None,
    sigma: float | None = None,
    *,
    num_points: int = 512,
    zero_rtol: float = ZERO_RTOL,
    scale: str = "linear",
) -> SpectralDensity:
    """Gaussian-smoothed spectral density ``φ(x) = (1/N) Σ_i N(x; λ_i, σ²)`` from SLQ nodes.

    From an :class:`SLQResult`: ``φ(x) ≈ (n / N) (1/s) Σ_p Σ_j w_pj N(x; θ_pj, σ²)``. From a
    :class:`DeflatedSLQ` the deflated top eigenvalues enter exactly (weight ``1/N`` each) and
    the quadrature covers only the rest. Nodes at or below ``zero_rtol * λ_max``, plus the
    ``N - n`` structural zeros of a dual side, form the ``zero_mass`` (the fraction of
    eigenvalues that are zero), reported separately with the standard error of its spread over
    probes and ``zero_mass_bound``, the Chebyshev–Markov–Stieltjes bound of the Gauss
    quadrature at the cut: the larger weight of the two nodes bracketing it (the quadrature
    cannot tell on which side of the cut the eigenvalues those nodes stand for lie). A large
    bound means the count is not resolved at this threshold: a spectrum that runs continuously
    through the cut (common for the sNTK of gated models) has no well-defined zero mass; put
    the cut in a gap of the spectrum or add Lanczos steps. No new products.

    On the linear scale the kernel is reflected at ``λ = 0`` (``N(x; λ_i, σ²) + N(-x; λ_i,
    σ²)`` for ``x >= 0``, zero below): the eigenvalues of the sNTK are nonnegative, and a plain
    Gaussian would put the mass of the small ones at ``λ < 0``. The mass is the same.

    Parameters
    ----------
    result : SLQResult or DeflatedSLQ
    grid : Tensor, optional
        Where to evaluate (in ``log10 λ`` for ``scale="log"``); default ``num_points`` points
        from ``min(node) - 3σ`` (not below 0 on the linear scale) to ``max(node) + 3σ`` over
        the nonzero nodes.
    sigma : float, optional
        Kernel width; default 1% of the range of the nonzero nodes (of their ``log10`` for
        ``scale="log"``), following Lin, Saad & Yang (2016).
    zero_rtol : float
        Nodes ``<= zero_rtol * λ_max`` count as zero eigenvalues.
    scale : {"linear", "log"}
        Smooth in ``λ`` or in ``log10 λ`` (useful for kernels spanning decades).
    """
    result = _check_slq(result)
    if scale not in ("linear", "log"):
        raise ValueError(f"expected scale='linear' or 'log', got {scale!r}")
    cut = _zero_cut(result, zero_rtol)
    N = result.primal_dimension
    nodes, w, quad = _measure(result)
    nonzero = nodes > cut
    zero_top = 0
    if _is_deflated(result):
        zero_top = int((result.top <= cut).sum())
    zero_per_probe = (
        result.extra_zeros + zero_top + quad.dimension * (quad.weights * (quad.nodes <= cut)).sum(dim=1)
    ) / N
    zero_mass, zero_se = mean_se(zero_per_probe)
    bound = _count_bound(quad, cut) / N
    x, w = nodes[nonzero], w[nonzero] / N
    if scale == "log":
        x = torch.log10(x)
    if x.numel() == 0:
        x = torch.zeros(1, dtype=torch.float64)
        w = torch.zeros(1, dtype=torch.float64)
    lo, hi = float(x.min()), float(x.max())
    if sigma is None:
        span = hi - lo
        sigma = 0.01 * span if span > 0 else (0.01 * abs(hi) if hi != 0 else 1.0)
    if not sigma > 0:
        raise ValueError(f"expected sigma > 0, got {sigma!r}")
    linear = scale == "linear"
    if grid is None:
        start = max(lo - 3 * sigma, 0.0) if linear else lo - 3 * sigma
        grid = torch.linspace(start, hi + 3 * sigma, int(num_points), dtype=torch.float64)
    grid = torch.as_tensor(grid, dtype=torch.float64)

    def kernel(centres):
        z = (grid[:, None] - centres[None, :]) / sigma
        return (torch.exp(-0.5 * z * z) * w[None, :]).sum(dim=1) / (sigma * math.sqrt(2 * math.pi))

    density = kernel(x)
    if linear:  # reflected at 0: no mass at negative eigenvalues
        density = torch.where(grid >= 0, density + kernel(-x), torch.zeros_like(density))
    return SpectralDensity(
        grid=grid,
        density=density,
        zero_mass=zero_mass,
        zero_mass_se=zero_se,
        zero_threshold=cut,
        sigma=float(sigma),
        scale=scale,
        side=result.side,
        dimension=result.dimension,
        primal_dimension=N,
        zero_mass_bound=bound,
    )


def _delta_se(samples: torch.Tensor, grad: torch.Tensor) -> float:
    """Delta-method standard error of ``g(mean)`` from per-probe samples ``[s, d]``."""
    s = samples.shape[0]
    if s < 2:
        return math.nan
    cov = torch.cov(samples.T).reshape(samples.shape[1], samples.shape[1]) / s
    return float(torch.sqrt(torch.clamp(grad @ cov @ grad, min=0.0)))


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    xp = torch.clamp(x, min=0.0)
    return torch.where(
        xp > 0, xp * torch.log(torch.where(xp > 0, xp, torch.ones_like(xp))), torch.zeros_like(xp)
    )


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _rank_from_quadrature(
    r: Any, kind: str, rtol: float, lambda_max: float | None
) -> tuple[float, float, float]:
    """``(value, standard error, quadrature error)`` of an effective rank from a quadrature
    result. Values are clamped to what a PSD spectrum allows (``[1, n]`` when ``A != 0``).
    """
    n = r.dimension
    s1 = r.samples(_identity)
    a = r.exact_part(_identity) + float(s1.mean())
    if kind == "participation":
        s2 = r.samples(_square)
        lo, hi = r.square_bounds(float(s1.mean()))
        t2 = min(max(float(s2.mean()), lo), hi)
        b = r.exact_part(_square) + getattr(r, "cross", 0.0) + t2
        if b <= 0 or a <= 0:
            return 0.0, math.nan, 0.0
        grad = torch.tensor([2 * a / b, -a * a / (b * b)], dtype=torch.float64)
        err = abs(float(grad[1])) * r.quadrature_change(_square, 2)
        value = min(max(a * a / b, 1.0), float(n))
        return value, _combine(_delta_se(torch.stack([s1, s2], dim=1), grad), err), err
    if kind == "entropy":
        st = r.samples(_xlogx)
        tl = r.exact_part(_xlogx) + float(st.mean())
        if a <= 0:
            return 0.0, math.nan, 0.0
        value = math.exp(math.log(a) - tl / a)
        grad = value * torch.tensor([1 / a + tl / (a * a), -1 / a], dtype=torch.float64)
        err = abs(float(grad[1])) * r.quadrature_change(_xlogx)
        se = _delta_se(torch.stack([s1, st], dim=1), grad)
        return min(max(value, 1.0), float(n)), _combine(se, err), err
    if kind == "stable":
        lmax = r.lambda_max if lambda_max is None else lambda_max
        if lmax <= 0:
            return 0.0, math.nan, 0.0
        _, se = mean_se(s1)
        return min(max(a / lmax, 1.0), float(n)), se / lmax, 0.0
    cut = rtol * (r.lambda_max if lambda_max is None else lambda_max)

    def above(x: torch.Tensor) -> torch.Tensor:
        return (x > cut).to(torch.float64)

    count = r.samples(above)
    est, se = mean_se(count)
    return est + r.exact_part(above), se, 0.0


_RANK_KINDS = ("participation", "entropy", "stable", "numerical")


def effective_rank(
    op_or_result: Any,
    kind: str = "participation",
    *,
    rtol: float = ZERO_RTOL,
    num_probes: int = 32,
    num_steps: int = 80,
    generator: torch.Generator | None = None,
    side: str = "auto",
    tol: float = 1e-6,
    deflate: bool = True,
) -> EffectiveRank:
    """Effective rank of a PSD operator, with a standard error where it is stochastic.

    Kinds (``λ_i`` the eigenvalues, ``p_i = λ_i / Σ λ``):

    * ``"participation"``: ``(tr K)² / tr(K²)``;
    * ``"entropy"``: ``exp(-Σ p_i log p_i) = exp(log tr K - tr(K log K) / tr K)``;
    * ``"stable"``: ``tr K / λ_max``;
    * ``"numerical"``: ``#{λ_i > rtol · λ_max}`` (a Gauss-quadrature estimate of the count).

    From an :class:`SLQResult` or a :class:`DeflatedSLQ` no new products are used. Given an
    operator, :func:`deflated_slq` runs (``deflate=True``, the default: the top of the
    spectrum exactly, SLQ with ``num_probes`` and ``num_steps`` on the rest; near a
    bifurcation, where one eigenvalue carries almost all of ``tr K²``, plain SLQ has huge
    variance and this does not), else plain :func:`slq`. Standard errors come from the delta
    method over the per-probe estimates, combined with the quadrature's last-step change
    (``status=TOO_FEW_STEPS`` when that exceeds 5% of the value). Values are clamped to
    ``[1, n]``. Zero eigenvalues (including the structural zeros of a dual side) contribute
    nothing, so every kind is the same from either side.

    References: Roy & Vetterli (2007) for the entropy rank; Rudelson & Vershynin (2007) for the
    stable rank; Ubaru, Chen & Saad (2017) for the SLQ estimates.
    """
    if kind not in _RANK_KINDS:
        raise ValueError(f"expected kind in {_RANK_KINDS}, got {kind!r}")
    lambda_max = None
    matvecs = 0
    if isinstance(op_or_result, SLQResult) or _is_deflated(op_or_result):
        r = op_or_result
    else:
        A = as_operator(op_or_result, side)
        gen, _ = _seed_of(generator)
        if deflate:
            r = deflated_slq(A, num_probes, num_steps, generator=gen, tol=tol)
        else:
            r = slq(A, num_probes, num_steps, generator=gen)
            if kind == "stable":
                top = eigsh(A, 1, "LA", tol, generator=gen)
                lambda_max = float(top.eigenvalues[0])
                matvecs += top.num_matvecs
        matvecs += r.num_matvecs
    method = _method_of(r) + ("+eigsh" if lambda_max is not None else "")
    value, se, err = _rank_from_quadrature(r, kind, rtol, lambda_max)
    return EffectiveRank(
        value=value,
        standard_error=se,
        kind=kind,
        method=method,
        num_matvecs=matvecs,
        side=r.side,
        primal_dimension=r.primal_dimension,
        seed=r.seed,
        quadrature_error=err,
        status=_quad_status(err, value),
    )
