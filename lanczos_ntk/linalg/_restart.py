"""Thick-restart (block) Lanczos for extreme eigenpairs of a symmetric operator."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from .._tolerances import NULL_EPS_FACTOR
from ._common import (
    WORK_DTYPE,
    Matmul,
    NumericalWarning,
    as_work,
    breakdown_tol,
    default_generator,
    finfo_eps,
    random_block,
)
from ._lanczos import KrylovState

__all__ = ["ExtremeEigenpairs", "thick_restart_lanczos"]

_WHICH = ("LA", "SA", "LM")
KEEP_PRODUCTS_BYTES = 1 << 30  # the raw products are kept when they take at most this much


class ExtremeEigenpairs(NamedTuple):
    """Output of :func:`thick_restart_lanczos` (plain tensors, float64).

    ``eigenvalues`` are sorted descending; ``residuals[i] = ||A y_i - θ_i y_i||`` is the true
    residual of the Ritz pair ``(θ_i, y_i)``, with ``A y_i`` combined from the operator's own
    products (kept beside the basis while they take at most ``KEEP_PRODUCTS_BYTES``), or from
    one more block product at the end when that combination leaves a pair short of ``tol``
    (the Krylov estimate ``||B_m E_mᵀ z_i||`` drives the iteration); ``converged[i]`` says
    whether it is below ``tol * max(|θ_i|, eps ||A||)``. ``null_dim`` is the estimated dimension of
    the numerical null space for ``which="SA"`` (``None`` otherwise), ``lambda_max`` the largest
    Ritz value seen, ``status`` one of ``"converged"``, ``"accuracy_limited"`` (the iteration
    converged but rounding in the products keeps some true residuals above ``tol``),
    ``"max_iterations"``, ``"failed"``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    num_matmuls: int
    num_restarts: int
    status: str
    null_dim: int | None
    lambda_max: float
    ncv: int
    breakdowns: int


def _order(theta: torch.Tensor, which: str, null: torch.Tensor) -> torch.Tensor:
    """Indices of the Ritz values in order of preference (null ones dropped for SA)."""
    if which == "LA":
        return torch.argsort(theta, descending=True)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True)
    idx = torch.argsort(theta)
    return idx[~null[idx]]


def _target(theta: torch.Tensor, tol: float, eps: float, anorm: float) -> torch.Tensor:
    """Residual each Ritz pair must reach: ``tol * max(|θ|, eps ||A||)`` (relative to the
    eigenvalue, as ARPACK; the ``eps ||A||`` only keeps exact zeros of ``A`` reachable).
    """
    return tol * torch.clamp(theta.abs(), min=eps * anorm)


def _converged(res: torch.Tensor, theta: torch.Tensor, tol: float, eps: float, anorm: float) -> torch.Tensor:
    """``res <= tol * max(|θ|, eps ||A||)``: the requested accuracy, nothing looser."""
    return res <= _target(theta, tol, eps, anorm)


def _converged_now(
    T: torch.Tensor, b: int, k: int, which: str, tol: float, eps: float, anorm: float, null_rtol: float
) -> bool:
    """Whether the ``k`` wanted Ritz pairs of the basis built so far already meet ``tol``: the
    test that ends a cycle, made after every step from the tridiagonal part ``T [m + b, m]``
    (a small ``eigh``), so a run stops at the product that converged it instead of at the end
    of its cycle.
    """
    m = T.shape[1]
    theta, Z = torch.linalg.eigh(0.5 * (T[:m] + T[:m].T))
    res = torch.linalg.vector_norm(T[m:, m - b :] @ Z[m - b :], dim=0)
    anorm = max(anorm, float(theta.abs().max()))
    wanted = _order(theta, which, theta <= null_rtol * anorm)[:k]
    return len(wanted) == k and bool(_converged(res[wanted], theta[wanted], tol, eps, anorm).all())


def _refuse_negative(theta: torch.Tensor, eps: float, lam_max: float) -> None:
    """``which="SA"`` is for positive semi-definite operators: refuse clearly negative ones.

    Ritz values interlace the spectrum, so a Ritz value below ``-sqrt(eps) λ_max`` proves an
    eigenvalue at least that negative (rounding cannot produce it).
    """
    low = float(theta.min()) if theta.numel() else 0.0
    if low < -(eps**0.5) * lam_max:
        raise ValueError(
            f"which='SA' finds the smallest nonzero eigenvalues of a positive semi-definite "
            f"operator, but this one has an eigenvalue <= {low:.6g} (largest magnitude "
            f"{lam_max:.6g}); for an indefinite operator use which='LA' on -A"
        )


def _start_block(v0: torch.Tensor | None, n: int, b: int, generator, device) -> torch.Tensor:
    if v0 is None:
        return random_block(n, b, generator, device)
    V = v0[:, None] if v0.ndim == 1 else v0
    if V.ndim != 2 or V.shape[0] != n:
        raise ValueError(f"expected v0 of shape [{n}] or [{n}, p], got {tuple(v0.shape)}")
    V = V.to(dtype=WORK_DTYPE, device=device)
    p = V.shape[1]
    if p < b:
        return torch.cat([V, random_block(n, b - p, generator, device)], dim=1)
    # fold the p warm-start vectors into b start vectors (each sees every direction once)
    out = torch.zeros(n, b, dtype=WORK_DTYPE, device=device)
    for j in range(p):
        out[:, j % b] += V[:, j] / torch.linalg.vector_norm(V[:, j]).clamp_min(1e-300)
    return out


def _dense(
    work: Matmul,
    n: int,
    k: int,
    which: str,
    null_rtol: float,
    b: int,
    device,
    return_eigenvectors: bool,
    eps: float,
) -> ExtremeEigenpairs:
    """Small problems: form the matrix with ``n`` products and call ``eigh``."""
    eye = torch.eye(n, dtype=WORK_DTYPE, device=device)
    chunk = max(b, 64)
    A = torch.cat([work(eye[:, i : i + chunk]) for i in range(0, n, chunk)], dim=1)
    A = 0.5 * (A + A.T)
    theta, Z = torch.linalg.eigh(A)
    lam_max = float(theta.abs().max()) if n else 0.0
    if which == "SA":
        _refuse_negative(theta, eps, lam_max)
    null = theta <= null_rtol * lam_max
    sel = _order(theta, which, null)[:k]
    res = torch.linalg.vector_norm(A @ Z[:, sel] - Z[:, sel] * theta[sel], dim=0)
    order = torch.argsort(theta[sel], descending=True)
    sel, res = sel[order], res[order]
    return ExtremeEigenpairs(
        eigenvalues=theta[sel],
        eigenvectors=Z[:, sel] if return_eigenvectors else None,
        residuals=res,
        converged=torch.ones(len(sel), dtype=torch.bool),
        num_matvecs=n,
        num_matmuls=-(-n // chunk),
        num_restarts=0,
        status="converged",
        null_dim=int(null.sum()) if which == "SA" else None,
        lambda_max=lam_max,
        ncv=n,
        breakdowns=0,
    )


def thick_restart_lanczos(
    matmul: Matmul,
    n: int,
    k: int,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    ncv: int | None = None,
    max_restarts: int = 200,
    block_size: int = 1,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = WORK_DTYPE,
    device=None,
    null_rtol: float | None = None,
    return_eigenvectors: bool = False,
    dense_max: int | None = None,
) -> ExtremeEigenpairs:
    """Extreme eigenpairs of a symmetric operator by thick-restart (block) Lanczos.

    A (block) Lanczos basis of ``ncv`` columns is grown with full reorthogonalisation; the
    Ritz pairs of ``T = Qᵀ A Q`` give residual bounds ``||A y - θ y|| = ||B_m E_mᵀ z||``. When
    the wanted ``k`` are not all converged the basis is compressed to the best ``p`` Ritz
    vectors ``Y = Q Z_p`` plus the residual block (Wu & Simon 2000), so that
    ``A Y = Y diag(θ_p) + Q_{m+1} B_m E_mᵀ Z_p`` (an arrowhead ``T``) and the recurrence
    continues from ``Q_{m+1}``. Memory stays ``O(n (ncv + b))``.

    ``which="SA"`` targets the smallest *nonzero* eigenvalues of a positive semi-definite
    operator: Ritz values ``<= null_rtol * λ_max`` are treated as the numerical null space;
    they are never wanted nor kept at a restart. Its dimension is estimated (``null_dim``) from
    the Gauss-quadrature weight of those Ritz values for the random start block of the first
    cycle, ``n · mean_i Σ_{θ_j < σ/2} z_{ij}²`` with ``σ`` the smallest nonzero eigenvalue found
    (exact when the null space is empty; otherwise a stochastic estimate, reliable when the first
    cycle resolves the gap ``σ / λ_max``, roughly ``ncv² σ / λ_max >~ 1``; not estimated with a
    user ``v0``, reported as 0). ``null_rtol`` defaults to
    ``1000 eps`` of the operator's dtype.

    Parameters
    ----------
    matmul : callable
        ``X [n, b] -> A X``.
    n, k : int
        Dimension and number of wanted eigenpairs.
    which : {"LA", "SA", "LM"}
        Largest algebraic, smallest (nonzero) algebraic, largest magnitude.
    tol : float
        Relative residual tolerance: ``||A y - θ y|| <= tol * max(|θ|, eps ||A||)``.
        Products in a dtype with unit roundoff ``eps`` carry errors of about
        ``eps ||A||`` (up to ``10 sqrt(n) eps ||A||``), so a pair with
        ``|θ| < eps ||A|| / tol`` may not reach ``tol``: when every unconverged residual sits
        at that floor and none has fallen by 10% for five cycles, the run stops with
        ``status="accuracy_limited"`` and those pairs are reported unconverged (their
        relative accuracy is about ``eps ||A|| / |θ|``). ``which="SA"`` raises
        ``ValueError`` on an operator with a clearly negative eigenvalue (below
        ``-sqrt(eps) λ_max``).
    ncv : int, optional
        Basis size, default ``max(2k + 2b, 20 + b, k + 6b)``.
    max_restarts : int
        Restart cycles before giving up (``status="max_iterations"``).
    block_size : int
        Vectors per operator call ``b``; a block finds eigenvalues of multiplicity up to ``b``.
    v0 : Tensor [n] or [n, p], optional
        Warm start (e.g. previous eigenvectors); ``p`` vectors are folded into ``b`` start
        vectors, missing ones are random.
    generator : torch.Generator, optional
        For the random start and the fresh directions after breakdowns.
    dense_max : int, optional
        Problems with ``n <= max(dense_max, ncv + b)`` are solved exactly from the dense matrix
        (``n`` products in blocks of 64, ``O(n²)`` memory). Default 1024 for ``"SA"`` (the
        small end of an ill-conditioned PSD spectrum, such as the sNTK's, is where Krylov
        methods need ``~sqrt(λ_max / gap)`` steps per digit), 0 otherwise.
    dtype, device :
        What the operator wants its blocks in (the recurrence runs in float64).

    Notes
    -----
    Cost per cycle: ``ncv - p`` products. References: Lanczos (1950); Paige (1972);
    Wu & Simon (2000), "Thick-restart Lanczos method for large symmetric eigenvalue problems".
    """
    if which not in _WHICH:
        raise ValueError(f"expected which in {_WHICH}, got {which!r}")
    if not isinstance(k, int) or k < 1 or k > n:
        raise ValueError(f"expected 1 <= k <= n = {n}, got k={k!r}")
    b = int(block_size)
    if b < 1:
        raise ValueError(f"expected block_size >= 1, got {block_size!r}")
    generator = default_generator(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    eps = finfo_eps(dtype)
    null_rtol = NULL_EPS_FACTOR * eps if null_rtol is None else float(null_rtol)
    work = as_work(matmul, dtype, device)
    if ncv is None:
        ncv = max(2 * k + 2 * b, 20 + b, k + 6 * b)
    ncv = int(ncv)
    if ncv < k + 2 * b:
        raise ValueError(f"expected ncv >= k + 2 * block_size = {k + 2 * b}, got {ncv}")
    if dense_max is None:
        dense_max = 1024 if which == "SA" else 0
    if n <= max(ncv + b, dense_max):
        return _dense(work, n, k, which, null_rtol, b, device, return_eigenvectors, eps)

    # keep the raw products (A Y for the true residuals at no extra product) while they are
    # small next to the memory a Krylov run may reasonably hold
    keep = n * (ncv + b) * 8 <= KEEP_PRODUCTS_BYTES
    state = KrylovState(work, n, b, ncv, eps=eps, generator=generator, device=device, keep_products=keep)
    state.start(_start_block(v0, n, b, generator, device))
    first: tuple[torch.Tensor, torch.Tensor] | None = None
    lam_max = 0.0
    null_dim = None  # estimated below from the first (random) start block only
    restarts = 0
    stalls = 0  # consecutive cycles in which every unconverged pair sat at the rounding floor
    best: torch.Tensor | None = None  # smallest residuals so far, sorted
    status = "max_iterations"
    while True:
        bd_before = len(state.breakdowns)
        closed = False  # a (nearly) invariant Krylov space in this cycle: copies may follow
        while state.c + b <= ncv:
            state.step()
            if state.nonfinite:
                break
            if which == "SA" or state.c < k:
                continue
            T = state.T[: state.c + b, : state.c].cpu()  # small: one transfer per step
            scale = max(state.anorm, float(T.diagonal().abs().max()))
            closed = closed or float(torch.linalg.norm(T[-b:, -b:])) <= eps**0.5 * scale
            if not closed and _converged_now(T, b, k, which, tol, eps, state.anorm, null_rtol):
                break  # converged inside the cycle: no product beyond the one that got there
        m = state.c
        Tm = state.T[:m, :m]
        theta, Z = torch.linalg.eigh(0.5 * (Tm + Tm.T))
        B = state.T[m : m + b, m - b : m]
        coupling = B @ Z[m - b : m]  # [b, m]: residual coefficients along the next block
        res = torch.linalg.vector_norm(coupling, dim=0)
        lam_max = max(lam_max, float(theta.abs().max()))
        state.anorm = max(state.anorm, lam_max)
        if which == "SA" and not state.nonfinite:
            _refuse_negative(theta, eps, lam_max)
        null = theta <= null_rtol * lam_max
        if which == "SA" and restarts == 0 and v0 is None:
            first = (theta, (Z[:b] ** 2).sum(dim=0) / b)  # Gauss nodes and weights of the start
        cand = _order(theta, which, null)
        wanted = cand[:k]
        conv = _converged(res[wanted], theta[wanted], tol, eps, state.anorm)
        if state.nonfinite:
            warnings.warn(
                "thick_restart_lanczos: the operator returned non-finite values; stopping early",
                NumericalWarning,
                stacklevel=2,
            )
            status = "failed"
            break
        if len(wanted) == k and bool(conv.all()):
            status = "converged"
            break
        exhausted = len(state.breakdowns) - bd_before >= 2
        if len(wanted) < k and bool(conv.all()) and exhausted:
            status = "converged"  # fewer than k nonzero eigenvalues exist
            break
        # at the rounding floor and no longer falling: more cycles cannot reach tol
        floor = breakdown_tol(n, eps, state.anorm)
        now = torch.sort(res[wanted]).values
        falling = (
            now < 0.9 * best
            if best is not None and best.shape == now.shape
            else torch.ones_like(now, dtype=torch.bool)
        )
        best = now if best is None or best.shape != now.shape else torch.minimum(best, now)
        stuck = ~conv & (res[wanted] <= floor)
        stalls = (
            stalls + 1 if bool(stuck.any()) and bool((conv | stuck).all()) and not bool(falling.any()) else 0
        )
        if stalls >= 5:
            status = "accuracy_limited"  # the products' rounding stops the residuals here
            break
        if restarts >= max_restarts:
            break
        restarts += 1
        p = min(len(cand), ncv - b, k + max(0, (ncv - b - k) // 2))
        sel = cand[:p]
        # the basis is stored vector by vector: the kept Ritz vectors as rows [p, n]
        Y = torch.mm(Z[:, sel].T, state.Q[:, :m].T)
        nxt = state.Q[:, m : m + b].clone()
        if state.AQ is not None:
            state.AQ[:, :p] = torch.mm(Z[:, sel].T, state.AQ[:, :m].T).T
        state.Q.zero_()
        state.T.zero_()
        state.Q[:, :p] = Y.T
        state.Q[:, p : p + b] = nxt
        state.T[:p, :p] = torch.diag(theta[sel])
        state.T[p : p + b, :p] = coupling[:, sel]
        state.T[:p, p : p + b] = coupling[:, sel].T
        state.c = p

    if first is not None:
        # null mass of the random start: quadrature weight below half the smallest nonzero
        # eigenvalue found (below the null threshold when none was found)
        cut = 0.5 * float(theta[wanted].min()) if len(wanted) else null_rtol * lam_max
        cut = max(cut, null_rtol * lam_max)
        null_dim = int(round(n * float(first[1][first[0] <= cut].sum())))
    order = torch.argsort(theta[wanted], descending=True)
    wanted = wanted[order]
    vecs = state.Q[:, :m] @ Z[:, wanted]
    values = theta[wanted].clone()
    res = res[wanted].clone()
    num_matmuls, num_matvecs = state.num_matmuls, state.num_matvecs
    if status != "failed" and len(wanted):
        # the true residuals ||A y - θ y||: the Krylov estimates above keep falling below the
        # rounding level of the products, the true ones do not. A y is combined from the kept
        # products; when that leaves a pair short of tol (where it differs from a product of y
        # itself by rounding), y gets a product of its own
        fresh = state.AQ is None
        while True:
            if fresh:
                AY = work(vecs)
                num_matmuls, num_matvecs = num_matmuls + 1, num_matvecs + len(wanted)
            else:
                assert state.AQ is not None  # kept whenever the products are not fresh
                AY = state.AQ[:, :m] @ Z[:, wanted]
            # Rayleigh quotients: eigh(T) has absolute errors ~ eps ||T||, which swamp small
            # eigenvalues next to huge ones (a 1e12 dynamic range); y^T A y does not
            values = (vecs * AY).sum(dim=0) / (vecs * vecs).sum(dim=0)
            res = torch.linalg.vector_norm(AY - vecs * values, dim=0)
            conv = _converged(res, values, tol, eps, state.anorm)
            if fresh or bool(conv.all()):
                break
            fresh = True
        order = torch.argsort(values, descending=True)
        values, vecs, res, conv = values[order], vecs[:, order], res[order], conv[order]
        if not bool(conv.all()) and status in ("converged", "accuracy_limited"):
            status = "accuracy_limited"
        elif bool(conv.all()) and status == "accuracy_limited":
            status = "converged"
    else:
        conv = _converged(res, values, tol, eps, state.anorm)
    return ExtremeEigenpairs(
        eigenvalues=values,
        eigenvectors=vecs if return_eigenvectors else None,
        residuals=res,
        converged=conv.cpu(),
        num_matvecs=num_matvecs,
        num_matmuls=num_matmuls,
        num_restarts=restarts,
        status=status,
        null_dim=null_dim,
        lambda_max=lam_max,
        ncv=ncv,
        breakdowns=len(state.breakdowns),
    )
