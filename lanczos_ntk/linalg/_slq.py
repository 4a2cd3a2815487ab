"""Stochastic Lanczos quadrature: independent Lanczos recurrences vectorised over probes."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import (
    WORK_DTYPE,
    Matmul,
    as_work,
    breakdown_tol,
    default_generator,
    finfo_eps,
    random_block,
    reorthogonalize,
)

__all__ = ["QuadratureNodes", "lanczos_quadrature"]


class QuadratureNodes(NamedTuple):
    """Per-probe Gauss quadrature of the spectral measure (float64, on the CPU).

    ``nodes[p]`` are the Ritz values of probe ``p``'s tridiagonal matrix and
    ``weights[p] = z_{1j}² ||v_p||² / n`` the squared first components of its eigenvectors, so
    ``n Σ_j weights[p, j] f(nodes[p, j])`` is an unbiased estimate of ``tr f(A)`` (exact for
    polynomials of degree ``< 2 m``). ``alpha``/``beta`` hold the recurrences.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    num_matvecs: int
    num_matmuls: int
    breakdowns: int


def _project_out(W: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """One classical Gram–Schmidt pass of ``W [n, p]`` against ``basis [p, j, n]`` per probe
    (in place): two batched matrix products, one small ``[j, n]`` basis per probe. Returns the
    coefficients ``[p, j, 1]``.
    """
    H = torch.bmm(basis, W.T.unsqueeze(-1))  # [p, j, 1]
    W -= torch.bmm(basis.transpose(1, 2), H).squeeze(-1).T
    return H


def _reorth(W: torch.Tensor, basis: torch.Tensor) -> None:
    """Reorthogonalise ``W [n, p]`` against each probe's basis (in place): one pass, a second
    only where :func:`reorthogonalize` asks for it (the basis then read twice per step, not
    four times).
    """
    reorthogonalize(W, lambda W: _project_out(W, basis))


def lanczos_quadrature(
    matmul: Matmul,
    n: int,
    num_probes: int,
    num_steps: int,
    *,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = WORK_DTYPE,
    device=None,
    reorthogonalize: bool = True,
    probes: torch.Tensor | None = None,
) -> QuadratureNodes:
    """Gauss quadrature nodes and weights for random probes (Ubaru, Chen & Saad 2017).

    For each probe ``v`` (Rademacher or Gaussian, drawn from ``generator``) run ``m`` Lanczos
    steps from ``v / ||v||``; with ``T_m = S diag(θ) Sᵀ`` the rule
    ``vᵀ f(A) v ≈ ||v||² Σ_j S_{1j}² f(θ_j)`` is exact for polynomials of degree ``< 2m``.
    All probes advance together: one ``matmul`` of an ``[n, num_probes]`` block per step.
    Breakdowns (the probe's Krylov space is invariant) continue with a fresh random direction
    orthogonal to that probe's basis and a zero coupling, which adds nodes of zero weight.

    Parameters
    ----------
    matmul : callable
        ``X [n, p] -> A X`` for a symmetric ``A``.
    n, num_probes, num_steps : int
        Dimension, probes, Lanczos steps per probe (capped at ``n``).
    probe : {"rademacher", "gaussian"}
    reorthogonalize : bool
        Full reorthogonalisation (memory ``8 n m p`` bytes); without it only the three-term
        recurrence is used (memory ``O(n p)``), which the quadrature tolerates well.
    probes : Tensor [n, p], optional
        Use these probe vectors instead of drawing them.

    Notes
    -----
    Cost: ``num_probes * num_steps`` products in ``num_steps`` calls.
    """
    if num_probes < 1 or num_steps < 1:
        raise ValueError(f"expected num_probes >= 1 and num_steps >= 1, got {num_probes}, {num_steps}")
    generator = default_generator(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    work = as_work(matmul, dtype, device)
    eps = finfo_eps(dtype)
    m = min(num_steps, n)
    if probes is None:
        V = random_block(n, num_probes, generator, device, probe)
    else:
        V = probes.to(dtype=WORK_DTYPE, device=device)
    p = V.shape[1]
    norms2 = (V * V).sum(dim=0)
    V = V / norms2.sqrt().clamp_min(1e-300)
    # probe-major, so that each probe's basis is one contiguous [m, n] matrix
    basis = torch.zeros(p, m, n, dtype=WORK_DTYPE, device=device) if reorthogonalize else None
    alpha = torch.zeros(p, m, dtype=WORK_DTYPE, device=device)
    beta = torch.zeros(p, m, dtype=WORK_DTYPE, device=device)  # beta[:, j] couples j and j+1
    V_prev = torch.zeros_like(V)
    anorm = torch.zeros(p, dtype=WORK_DTYPE, device=device)
    breakdowns = 0
    for j in range(m):
        if basis is not None:
            basis[:, j] = V.T
        W = work(V)
        if not bool(torch.isfinite(W).all()):
            raise ValueError(
                f"the operator returned non-finite values at Lanczos step {j}; "
                "check the model's states for overflow (NaN or inf)"
            )
        if j > 0:
            W -= V_prev * beta[:, j - 1]
        a = (V * W).sum(dim=0)
        W -= V * a
        if basis is not None:
            _reorth(W, basis[:, : j + 1])
        alpha[:, j] = a
        nrm = torch.linalg.vector_norm(W, dim=0)
        prev = beta[:, j - 1] if j > 0 else torch.zeros_like(a)
        anorm = torch.maximum(anorm, a.abs() + nrm + prev)
        if j == m - 1:
            beta[:, j] = nrm
            break
        tol = torch.tensor([breakdown_tol(n, eps, float(x)) for x in anorm], dtype=WORK_DTYPE, device=device)
        broken = nrm <= tol
        V_prev = V
        V = W / torch.where(broken, torch.ones_like(nrm), nrm)
        if bool(broken.any()):
            idx = torch.nonzero(broken).flatten().tolist()
            breakdowns += len(idx)
            fresh = random_block(n, len(idx), generator, device)
            for c, i in enumerate(idx):
                x = fresh[:, c]
                if basis is not None:
                    for _ in range(2):
                        x = x - basis[i, : j + 1].T @ (basis[i, : j + 1] @ x)
                V[:, i] = x / torch.linalg.vector_norm(x).clamp_min(1e-300)
            nrm = torch.where(broken, torch.zeros_like(nrm), nrm)
        beta[:, j] = nrm
    T = torch.diag_embed(alpha) + torch.diag_embed(beta[:, :-1], 1) + torch.diag_embed(beta[:, :-1], -1)
    theta, S = torch.linalg.eigh(T)
    weights = S[:, 0, :] ** 2 * (norms2 / n)[:, None]
    return QuadratureNodes(
        nodes=theta.cpu(),
        weights=weights.cpu(),
        alpha=alpha.cpu(),
        beta=beta[:, :-1].cpu(),
        num_matvecs=m * p,
        num_matmuls=m,
        breakdowns=breakdowns,
    )
