"""After a Lanczos run: look for eigenvalues it missed (repeated ones) and add them.

Single-vector Lanczos finds one copy of a repeated eigenvalue in exact arithmetic and further
copies only as rounding lets them in, so a converged top-``k`` can silently skip copies. The
check here deflates the pairs found and runs a short Lanczos on the rest from a fresh random
start: anything at or above the ``k``-th eigenvalue there was missed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import WORK_DTYPE, Matmul, as_work, breakdown_tol, finfo_eps, random_block
from ._restart import _converged, thick_restart_lanczos

__all__ = ["Completed", "complete_multiplicities"]


class Completed(NamedTuple):
    """The top-``k`` after the check: pairs, true residuals, convergence mask, cost, and the
    status of the pairs (``"converged"``, ``"accuracy_limited"`` when the unconverged ones sit
    at the rounding floor ``10 sqrt(n) eps ||A||``, else ``"max_iterations"``).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    missed: int
    num_matvecs: int
    num_matmuls: int
    status: str


def _key(theta: torch.Tensor, which: str) -> torch.Tensor:
    return theta.abs() if which == "LM" else theta


def complete_multiplicities(
    matmul: Matmul,
    n: int,
    eigenvalues: torch.Tensor,
    eigenvectors: torch.Tensor,
    residuals: torch.Tensor,
    *,
    which: str = "LA",
    tol: float = 1e-6,
    anorm: float,
    check_tol: float = 1e-3,
    max_rounds: int = 8,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = WORK_DTYPE,
    device=None,
) -> Completed:
    """Find eigenpairs at or beyond the ``k``-th of a converged run that the run missed.

    With ``Y`` the ``k`` Ritz vectors found, Lanczos (``k=1``, relative tolerance
    ``check_tol``) on ``(I - YYᵀ) A (I - YYᵀ)`` from a random start in ``range(Y)⊥`` gives a
    Ritz pair ``(θ', y')``; if ``θ' + ||r'||`` reaches the ``k``-th Ritz value (in magnitude
    for ``which="LM"``), ``y'`` joins ``Y``, a Rayleigh–Ritz step on ``[Y, y']`` picks the best
    ``k`` again, and the check repeats (at most ``max_rounds`` times). Each round costs the
    short run plus, when something was missed, ``k + 1`` products for the Rayleigh–Ritz step.

    ``residuals`` are the true residuals of the pairs passed. Returns the (possibly updated)
    pairs with their true residuals ``||A y - θ y||`` and ``converged`` against ``tol * max(|θ|, eps anorm)``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    eps = finfo_eps(dtype)
    work = as_work(matmul, dtype, device)
    k = eigenvalues.numel()
    Y = eigenvectors.to(dtype=WORK_DTYPE, device=device)
    theta = eigenvalues.to(WORK_DTYPE)
    res = residuals.to(WORK_DTYPE)
    matvecs = matmuls = missed = 0
    for _ in range(max_rounds):
        if Y.shape[1] >= n:
            break

        def deflated(X: torch.Tensor, Y: torch.Tensor = Y) -> torch.Tensor:
            X = X - Y @ (Y.T @ X)
            W = work(X)
            return W - Y @ (Y.T @ W)

        start = random_block(n, 1, generator, device)
        start = start - Y @ (Y.T @ start)
        chk = thick_restart_lanczos(
            deflated,
            n,
            1,
            which=which,
            tol=check_tol,
            v0=start[:, 0],
            ncv=12,
            generator=generator,
            device=device,
            dense_max=0,
            return_eigenvectors=True,
        )
        matvecs, matmuls = matvecs + chk.num_matvecs, matmuls + chk.num_matmuls
        if chk.status == "failed" or chk.eigenvalues.numel() == 0:
            break
        assert chk.eigenvectors is not None  # asked for
        kth = float(_key(theta, which).min())
        if float(_key(chk.eigenvalues, which)[0]) + float(chk.residuals[0]) < kth:
            break
        # a missed pair: converge it to tol, then Rayleigh–Ritz on [Y, y'] and keep the best k
        fine = thick_restart_lanczos(
            deflated,
            n,
            1,
            which=which,
            tol=tol,
            v0=chk.eigenvectors[:, 0],
            generator=generator,
            device=device,
            dense_max=0,
            return_eigenvectors=True,
        )
        matvecs, matmuls = matvecs + fine.num_matvecs, matmuls + fine.num_matmuls
        best = (fine if fine.status != "failed" else chk).eigenvectors
        assert best is not None
        y = best[:, :1]
        y = y - Y @ (Y.T @ y)
        Q, _ = torch.linalg.qr(torch.cat([Y, y / torch.linalg.vector_norm(y)], dim=1))
        AQ = work(Q)
        matvecs, matmuls = matvecs + Q.shape[1], matmuls + 1
        H = Q.T @ AQ
        vals, S = torch.linalg.eigh(0.5 * (H + H.T))
        keep = torch.argsort(_key(vals, which), descending=True)[:k]
        keep = keep[torch.argsort(vals[keep], descending=True)]
        Y, AY = Q @ S[:, keep], AQ @ S[:, keep]
        theta = (Y * AY).sum(dim=0) / (Y * Y).sum(dim=0)  # Rayleigh quotients (see _restart)
        res = torch.linalg.vector_norm(AY - Y * theta, dim=0)
        missed += 1
    anorm = max(anorm, float(theta.abs().max()))
    conv = _converged(res, theta, tol, eps, anorm)
    floor = breakdown_tol(n, eps, anorm)
    status = (
        "converged"
        if bool(conv.all())
        else "accuracy_limited"
        if bool((conv | (res <= floor)).all())
        else "max_iterations"
    )
    return Completed(theta, Y, res, conv.cpu(), missed, matvecs, matmuls, status)
