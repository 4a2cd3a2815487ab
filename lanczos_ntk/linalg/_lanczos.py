"""(Block) Lanczos tridiagonalisation with full reorthogonalisation.

The recurrence, the basis and the projected matrix are held in float64 whatever the dtype of the
operator: blocks are cast to the operator's dtype and device for each product and back after.
"""

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

__all__ = ["LanczosDecomposition", "lanczos"]


class LanczosDecomposition(NamedTuple):
    """``A Q = Q T + R E_mᵀ`` for an orthonormal ``Q`` and a (block) tridiagonal ``T``.

    Attributes
    ----------
    basis : Tensor [n, m]
        Orthonormal Lanczos basis ``Q`` (float64).
    T : Tensor [m, m]
        Projected matrix ``Qᵀ A Q`` (symmetric, (block) tridiagonal; zero couplings where the
        recurrence broke down and restarted with a fresh random vector).
    residual : Tensor [n, b]
        ``R`` with ``A Q - Q T = R E_mᵀ`` (``E_m`` the last ``b`` columns of the identity).
    alpha, beta : Tensor [m], Tensor [m - 1]
        Diagonal and first off-diagonal of ``T`` (for block size 1 the whole of ``T``).
    beta_last : float
        Norm of the residual (``beta_m`` for block size 1).
    num_matvecs : int
        Number of operator-vector products (columns), ``m`` for block size ``b`` dividing ``m``.
    breakdowns : tuple of int
        Columns at which a fresh random direction was inserted (invariant subspace found).
    """

    basis: torch.Tensor
    T: torch.Tensor
    residual: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor
    beta_last: float
    num_matvecs: int
    breakdowns: tuple

    def ritz(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ritz values ``θ`` (ascending), Ritz vectors ``Q S`` and residual bounds.

        The bound for pair ``i`` is ``||R E_mᵀ s_i|| = ||A Q s_i - θ_i Q s_i||`` (for block size
        1, ``β_m |s_{m,i}|``, Paige 1972).
        """
        theta, S = torch.linalg.eigh(self.T)
        b = self.residual.shape[1]
        res = torch.linalg.vector_norm(self.residual @ S[-b:], dim=0)
        return theta, self.basis @ S, res


class KrylovState:
    """Orthonormal basis ``Q`` and projected matrix ``T`` grown one block at a time.

    Columns ``[0, c)`` are complete; ``Q[:, c:c+b]`` is the current block and
    ``A Q_c = Q_c T_c + Q[:, c:c+b] T[c:c+b, :c]``. :meth:`step` applies the operator to the
    current block, orthogonalises the image against the whole basis (a second classical
    Gram–Schmidt pass when a column lost more than ``1 - 1/sqrt(2)`` of its norm, Daniel et al.
    1976) and appends the next block by a Gram–Schmidt QR that replaces directions below the
    breakdown threshold ``10 sqrt(n) eps ||A||`` by fresh random vectors (coupling zero).

    With ``keep_products=True`` the raw products are kept as well: ``AQ[:, j]`` is the
    operator's own output for ``Q[:, j]`` (before any orthogonalisation), so ``A (Q z)`` is
    ``AQ z`` for any combination ``z`` without another product (true residuals, Rayleigh
    quotients, thick restarts). It doubles the basis memory.
    """

    def __init__(
        self,
        work: Matmul,
        n: int,
        b: int,
        capacity: int,
        *,
        eps: float,
        generator: torch.Generator | None,
        device,
        keep_products: bool = False,
    ) -> None:
        self.work, self.n, self.b, self.eps = work, n, b, eps
        self.generator, self.device = generator, device
        # the basis [n, capacity + b] stored vector by vector (column-major): a column is read
        # and written once per step (the product's input, the new direction), and as a
        # strided column of a row-major matrix each of those cost 50-60 µs at n = 17k, a
        # fifth of the whole step's own work
        self.Q = torch.zeros(capacity + b, n, dtype=WORK_DTYPE, device=device).T
        self.AQ = torch.zeros_like(self.Q) if keep_products else None
        self.T = torch.zeros(capacity + b, capacity + b, dtype=WORK_DTYPE, device=device)
        self.c = 0
        self.anorm = 0.0
        self.num_matvecs = 0
        self.num_matmuls = 0
        self.breakdowns: list[int] = []
        self.nonfinite = False

    # -- orthogonalisation -------------------------------------------------------------------
    def _project_out(self, W: torch.Tensor, upto: int) -> torch.Tensor:
        """Remove from ``W`` its components along ``Q[:, :upto]``; return the coefficients."""
        Qc = self.Q[:, :upto]
        H = Qc.T @ W
        W.addmm_(Qc, H, alpha=-1.0)
        return H

    def _fresh_direction(self, cols: int, extra: torch.Tensor) -> torch.Tensor | None:
        """A unit random vector orthogonal to ``Q[:, :cols]`` and ``extra`` (or None: no room)."""
        if cols + extra.shape[1] >= self.n:
            return None
        basis = torch.cat([self.Q[:, :cols], extra], dim=1)
        for _ in range(3):  # a draw can (rarely) lie in the span already: draw again
            x = random_block(self.n, 1, self.generator, self.device)[:, 0]
            for _ in range(2):
                x -= basis @ (basis.T @ x)
            nrm = torch.linalg.vector_norm(x)
            if torch.isfinite(nrm) and nrm > 1e-8:
                return x / nrm
        return None

    def orthonormal_block(self, W: torch.Tensor, cols: int, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Gram–Schmidt QR of ``W`` (already orthogonal to ``Q[:, :cols]``) with replacement.

        Returns ``(V, R)`` with ``W ≈ V R``; a column whose remaining norm is ``<= tol`` gets
        ``R[i, i] = 0`` and ``V[:, i]`` a fresh random unit vector (zero if the space is full).
        """
        b = W.shape[1]
        R = torch.zeros(b, b, dtype=WORK_DTYPE, device=W.device)
        if b == 1:  # one vector: its norm (the loop below in one operation)
            nrm = float(torch.linalg.vector_norm(W))
            if nrm > tol:
                R[0, 0] = nrm
                return W / nrm, R
        V = torch.zeros_like(W)
        for i in range(b):
            x = W[:, i].clone()
            for _ in range(2):
                if i > 0:
                    h = V[:, :i].T @ x
                    x -= V[:, :i] @ h
                    R[:i, i] += h
            nrm = float(torch.linalg.vector_norm(x))
            if nrm > tol:
                V[:, i] = x / nrm
                R[i, i] = nrm
            else:
                self.breakdowns.append(cols + i)
                fresh = self._fresh_direction(cols, V[:, :i])
                if fresh is not None:
                    V[:, i] = fresh
        return V, R

    # -- the recurrence ----------------------------------------------------------------------
    def start(self, V0: torch.Tensor) -> None:
        """Set the current block to an orthonormal basis of ``V0`` (random fill if rank-deficient)."""
        V0 = V0.to(dtype=WORK_DTYPE, device=self.device)
        nrm = float(torch.linalg.matrix_norm(V0)) if V0.numel() else 0.0
        V, _ = self.orthonormal_block(V0 / (nrm if nrm > 0 else 1.0), 0, 1e-10)
        self.breakdowns.clear()
        self.Q[:, : V.shape[1]] = V
        self.c = 0

    def step(self) -> None:
        """Expand the current block ``Q[:, c:c+b]``: fill ``T[c:c+b, c:c+b]`` and the next block."""
        c, b = self.c, self.b
        Qj = self.Q[:, c : c + b]
        W = self.work(Qj)
        self.num_matvecs += b
        self.num_matmuls += 1
        # a sum is not finite when an entry is not (one pass; the full test only then, since
        # the sum of finite float64 entries can overflow)
        if not bool(torch.isfinite(W.sum())) and not bool(torch.isfinite(W).all()):
            self.nonfinite = True
            W = torch.zeros_like(W)
        if self.AQ is not None:
            self.AQ[:, c : c + b] = W
        if c > 0:  # the couplings to earlier blocks: the previous one, all of them after a restart
            coef = self.T[:c, c : c + b]
            lo = c - b if c > b and not bool(coef[: c - b].any()) else 0
            W.addmm_(self.Q[:, lo:c], coef[lo:], alpha=-1.0)
        D = Qj.T @ W
        D = 0.5 * (D + D.T)
        if b == 1:
            W.addcmul_(Qj, D, value=-1.0)  # a product with [1, 1] costs more than this
        else:
            W.addmm_(Qj, D, alpha=-1.0)
        H, after = reorthogonalize(W, lambda W: self._project_out(W, c + b))
        Hc = H[c : c + b]
        D += 0.5 * (Hc + Hc.T)
        self.T[c : c + b, c : c + b] = D
        col_sums = self.T[: c + b, c : c + b].abs().sum(dim=0) + after
        self.anorm = max(self.anorm, float(col_sums.max()))
        tol = breakdown_tol(self.n, self.eps, self.anorm)
        V, R = self.orthonormal_block(W, c + b, tol)
        self.Q[:, c + b : c + 2 * b] = V
        self.T[c + b : c + 2 * b, c : c + b] = R
        self.T[c : c + b, c + b : c + 2 * b] = R.T
        self.c = c + b


def lanczos(
    matmul: Matmul,
    v0: torch.Tensor,
    num_steps: int,
    *,
    dtype: torch.dtype | None = None,
    device=None,
    generator: torch.Generator | None = None,
) -> LanczosDecomposition:
    """Lanczos (block Lanczos if ``v0`` has several columns) with full reorthogonalisation.

    Builds an orthonormal basis ``Q`` of the Krylov space
    ``span{v0, A v0, ..., A^{m-1} v0}`` and ``T = Qᵀ A Q`` (tridiagonal for one start vector,
    block tridiagonal with upper-triangular couplings for a block start) such that
    ``A Q = Q T + R E_mᵀ``. Every new direction is orthogonalised against the whole basis,
    twice when the first pass loses more than ``1 - 1/sqrt(2)`` of its norm. When a new
    direction falls below ``10 sqrt(n) eps ||A||`` (an invariant subspace was found; ``||A||``
    estimated from the running ``T``) it is replaced by a fresh random vector orthogonal to the
    basis and its coupling is set to zero, so ``T`` becomes block diagonal and all-zero or
    low-rank operators cause no NaNs.

    Parameters
    ----------
    matmul : callable
        ``X [n, k] -> A X`` for a symmetric ``A``.
    v0 : Tensor [n] or [n, b]
        Start vector (or block).
    num_steps : int
        Number of blocks ``m / b``; capped so that ``m <= n``.
    dtype, device :
        Dtype and device the operator wants its blocks in (default: those of ``v0``).
    generator : torch.Generator, optional
        Source of the fresh directions after a breakdown.

    Returns
    -------
    LanczosDecomposition

    Notes
    -----
    Cost: ``m`` operator-vector products (``m / b`` calls of ``matmul``) and
    ``O(n m²)`` flops for the reorthogonalisation; memory ``O(n m)``.
    References: Lanczos (1950); Paige (1972); Golub & Underwood (1977) for the block form.

    Examples
    --------
    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> dec = lanczos(lambda X: A @ X, torch.ones(5, dtype=torch.float64), 5)
    >>> torch.linalg.eigvalsh(dec.T).round(decimals=8).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    V0 = v0[:, None] if v0.ndim == 1 else v0
    if V0.ndim != 2:
        raise ValueError(f"expected v0 of shape [n] or [n, b], got {tuple(v0.shape)}")
    n, b = V0.shape
    if num_steps < 1:
        raise ValueError(f"expected num_steps >= 1, got {num_steps}")
    steps = min(num_steps, n // b)
    if steps < 1:
        raise ValueError(f"block of {b} start vectors exceeds the dimension {n}")
    dtype = dtype or (v0.dtype if v0.dtype.is_floating_point else WORK_DTYPE)
    device = device or v0.device
    generator = default_generator(generator)
    state = KrylovState(
        as_work(matmul, dtype, device),
        n,
        b,
        steps * b,
        eps=finfo_eps(dtype),
        generator=generator,
        device=device,
    )
    state.start(V0)
    for _ in range(steps):
        state.step()
        if state.nonfinite:
            raise ValueError(
                f"the operator returned non-finite values after {state.num_matvecs} "
                "products; check the model's states for overflow (NaN or inf)"
            )
    m = state.c
    T = state.T[:m, :m].clone()
    B = state.T[m : m + b, m - b : m]
    R = state.Q[:, m : m + b] @ B
    return LanczosDecomposition(
        basis=state.Q[:, :m].clone(memory_format=torch.contiguous_format),
        T=T,
        residual=R,
        alpha=torch.diagonal(T).clone(),
        beta=torch.diagonal(T, -1).clone(),
        beta_last=float(torch.linalg.matrix_norm(B, 2)),
        num_matvecs=state.num_matvecs,
        breakdowns=tuple(state.breakdowns),
    )
