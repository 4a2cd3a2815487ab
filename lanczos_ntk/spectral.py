"""Spectral quantities of symmetric (PSD) operators: the public front door.

Every function accepts the operator in any of these forms (see :func:`as_operator`):

* a dense symmetric ``torch.Tensor`` ``[n, n]`` (or a numpy array);
* a ``linear_operator.LinearOperator`` or any object with ``.shape`` and ``.matmul``
  (e.g. :class:`lanczos_ntk.StateNTK`);
* a ``scipy.sparse.linalg.LinearOperator`` or a ``scipy.sparse`` matrix / array;
* a tuple ``(matvec, n)``: ``matvec`` maps float64 CPU tensors ``[n, k] -> [n, k]`` (a function
  that only takes vectors ``[n]`` is detected on the first call and applied column by column).

Every routine here assumes a symmetric operator: dense and sparse matrices are checked entry by
entry, callables and scipy operators by a randomized probe (two products), and a clearly
non-symmetric operator is refused with a ``ValueError``.

An operator with a ``.dual()`` method (the sNTK ``K = J Jᵀ``, ``M × M``, whose dual is the
parameter-space Gram ``G = Jᵀ J``, ``P × P``, with the same nonzero eigenvalues) is worked on
from whichever side is smaller (``side="auto"``); results record the side and account for the
``|M - P|`` extra zeros, so they always describe the operator that was passed.

The expensive part (Lanczos runs) is separated from the cheap part: :func:`slq` returns the
quadrature nodes and weights once, and :func:`spectral_density`, :func:`tr_f`,
:func:`effective_rank` and :func:`trace_from_slq` reuse them without new products.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from . import linalg
from ._results import Result, Status
from ._tolerances import ZERO_RTOL
from .linalg import NumericalWarning
from .linalg._common import mean_se

__all__ = [
    "ConditionNumber",
    "EffectiveRank",
    "EigshResult",
    "NoConvergence",
    "NumericalWarning",
    "SLQResult",
    "SpectralDensity",
    "TraceResult",
    "as_operator",
    "condition_number",
    "effective_rank",
    "eigsh",
    "slq",
    "spectral_density",
    "tr_f",
    "trace",
    "trace_from_slq",
]

_DEFAULT_SEED = 0


# ------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EigshResult(Result):
    """Extreme eigenpairs from :func:`eigsh`.

    Attributes
    ----------
    eigenvalues : Tensor [k'] (float64, descending)
        ``k' = k`` except for ``which="SA"`` on an operator with fewer than ``k`` nonzero
        eigenvalues, and for ``k`` above the dimension ``n`` of the side worked on (then all
        ``n`` eigenvalues, from a dense solve, with a warning; scipy does the same).
    eigenvectors : Tensor [dimension, k'] or None
        Orthonormal Ritz vectors (float64) of the side worked on (``side``; the operator passed
        unless ``side="dual"`` was asked for, in which case for the sNTK they are eigenvectors
        ``x`` of ``G = Jᵀ J`` and ``J x / sqrt(λ)`` are those of ``K``).
    residuals : Tensor [k']
        True residuals ``||A y - θ y||`` of the Ritz pairs (one block product after the run).
    converged : Tensor [k'] (bool)
        ``residuals <= tol * max(|θ|, eps ||A||)``: the requested accuracy, nothing
        looser. ``status`` is ``CONVERGED`` only when all are; ``ACCURACY_LIMITED`` when the
        iteration converged but rounding in the products (about ``eps ||A||`` for the
        operator's dtype) keeps some residuals above the target, typically eigenvalues below
        ``eps ||A|| / tol``.
    missed_copies : int
        Eigenpairs that the Lanczos run had missed (copies of repeated eigenvalues) and the
        check after it found (``verify=True``).
    null_dim : int or None
        ``which="SA"`` only: estimated dimension of the (numerical) null space of the operator
        passed, i.e. the structural ``|M - P|`` zeros of the side not worked on plus an estimate
        for the side worked on (see :func:`lanczos_ntk.linalg.thick_restart_lanczos`); ``None``
        when it was not estimated (a warm start ``v0`` was given).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor | None
    residuals: torch.Tensor
    converged: torch.Tensor
    status: Status
    k: int
    which: str
    tol: float
    null_dim: int | None
    lambda_max: float
    num_matvecs: int
    num_matmuls: int
    num_restarts: int
    block_size: int
    ncv: int
    side: str
    dimension: int
    primal_dimension: int
    dtype: str
    device: str
    seed: int | None
    missed_copies: int = 0


@dataclasses.dataclass(frozen=True)
class SLQResult(Result):
    """Stochastic Lanczos quadrature of the spectral measure, from :func:`slq`.

    ``nodes[p, j]`` and ``weights[p, j]`` (float64, ``[num_probes, num_steps]``) are the Gauss
    quadrature of probe ``p``'s spectral measure on the side worked on (``dimension`` ``n``):
    ``n Σ_j weights[p, j] f(nodes[p, j])`` estimates ``tr f`` there. The operator passed has
    ``primal_dimension`` ``N`` and ``N - n`` extra zero eigenvalues (0 unless a dual side was
    used), so ``tr f(K) = tr f(G) + (N - n) f(0)``.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    dimension: int
    primal_dimension: int
    side: str
    num_probes: int
    num_steps: int
    probe: str
    reorthogonalize: bool
    num_matvecs: int
    breakdowns: int
    status: Status
    dtype: str
    device: str
    seed: int | None

    @property
    def extra_zeros(self) -> int:
        """Zero eigenvalues of the operator passed that the side worked on does not carry."""
        return self.primal_dimension - self.dimension

    alpha: torch.Tensor | None = None
    beta: torch.Tensor | None = None

    @property
    def lambda_max(self) -> float:
        """Largest node: a lower bound on ``λ_max``, tight after a few tens of steps."""
        return float(self.nodes.max())

    # -- the quadrature interface shared with DeflatedSLQ: tr f = exact + mean(samples) ------
    def exact_part(self, f: Callable[[torch.Tensor], torch.Tensor]) -> float:
        """The deterministic part of ``tr f``: ``(N - n) f(0)`` for the structural zeros."""
        return self.extra_zeros * _f_at_zero(f) if self.extra_zeros else 0.0

    def samples(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Per-probe estimates ``n Σ_j w_pj f(θ_pj)`` of the stochastic part (``[num_probes]``)."""
        return self.dimension * (self.weights * _apply(f, self.nodes)).sum(dim=1)

    def quadrature_change(self, f: Callable[[torch.Tensor], torch.Tensor],
                          degree: int | None = None) -> float:
        """How much the last Lanczos step moved the estimate of ``tr f``: the mean over probes of
        the ``m``-step minus the ``(m-1)``-step quadrature (Gauss quadrature converges fast, so
        this over-states the error of the ``m``-step rule). ``0`` for a polynomial ``f`` of
        ``degree < 2m`` (exact), ``inf`` when it cannot be told (``m = 1``, or no recurrences)."""
        m = self.nodes.shape[1]
        if degree is not None and degree < 2 * m:
            return 0.0
        if m < 2 or self.alpha is None or self.beta is None:
            return math.inf
        T = torch.diag_embed(self.alpha[:, : m - 1]) + torch.diag_embed(self.beta[:, : m - 2], 1) \
            + torch.diag_embed(self.beta[:, : m - 2], -1)
        theta, S = torch.linalg.eigh(T)
        w = S[:, 0, :] ** 2 * self.weights.sum(dim=1, keepdim=True)
        prev = self.dimension * (w * _apply(f, theta)).sum(dim=1)
        return abs(float((self.samples(f) - prev).mean()))

    def square_bounds(self, t1: float) -> tuple[float, float]:
        """Bounds on the stochastic part of ``tr A²`` given that of ``tr A``:
        ``tr(A)² / n <= tr A²`` (Cauchy–Schwarz); no useful upper bound."""
        return t1 * t1 / max(self.dimension, 1), math.inf


@dataclasses.dataclass(frozen=True)
class SpectralDensity(Result):
    """Gaussian-smoothed spectral density from :func:`spectral_density`.

    ``density`` on ``grid`` integrates (over the grid variable) to ``1 - zero_mass``; the mass of
    eigenvalues at or below ``zero_threshold`` (relative ``zero_rtol`` of ``λ_max``, including
    the structural zeros of a dual side) is ``zero_mass`` (with its standard error across
    probes), reported separately so that it does not swamp the plot. With ``scale="log"`` the
    grid is ``log10 λ`` and ``density`` is per decade.
    """

    grid: torch.Tensor
    density: torch.Tensor
    zero_mass: float
    zero_mass_se: float
    zero_threshold: float
    sigma: float
    scale: str
    side: str
    dimension: int
    primal_dimension: int
    zero_mass_bound: float = 0.0


@dataclasses.dataclass(frozen=True)
class TraceResult(Result):
    """A trace estimate ``tr f(A)`` with its standard error: the spread over probes combined
    with ``quadrature_error`` (the change over the last Lanczos step, 0 where exact); ``status``
    is ``TOO_FEW_STEPS`` when that change exceeds 5% of the estimate."""

    estimate: float
    standard_error: float
    method: str
    num_matvecs: int
    side: str
    dimension: int
    primal_dimension: int
    seed: int | None
    quadrature_error: float = 0.0
    status: Status = Status.CONVERGED


@dataclasses.dataclass(frozen=True)
class EffectiveRank(Result):
    """An effective rank with its standard error (``nan`` where not stochastic).

    ``standard_error`` combines the spread over probes with ``quadrature_error``, the change of
    the estimate over the last Lanczos step (0 where the quadrature is exact); ``status`` is
    ``TOO_FEW_STEPS`` when that change exceeds 5% of the value (add ``num_steps``).
    """

    value: float
    standard_error: float
    kind: str
    method: str
    num_matvecs: int
    side: str
    primal_dimension: int
    seed: int | None
    quadrature_error: float = 0.0
    status: Status = Status.CONVERGED


@dataclasses.dataclass(frozen=True)
class ConditionNumber(Result):
    """``λ_max / λ_min`` of the nonzero part of a PSD operator, from two :func:`eigsh` runs."""

    value: float
    lambda_max: float
    lambda_min: float
    null_dim: int | None
    status: Status
    num_matvecs: int
    side: str
    primal_dimension: int


class NoConvergence(RuntimeError):
    """Raised by :func:`eigsh` with ``raise_on_failure=True``; ``.result`` holds the partial
    :class:`EigshResult` (Ritz pairs, residuals and the ``converged`` mask)."""

    def __init__(self, message: str, result: EigshResult):
        super().__init__(message)
        self.result = result


# ------------------------------------------------------------------------------------------
# Operator coercion
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Operator:
    """A symmetric operator reduced to what :mod:`lanczos_ntk.linalg` needs.

    ``matmul`` takes ``[n, k]`` blocks in ``dtype`` on ``device``. ``side`` says whether it is
    the operator passed (``"primal"``) or its ``.dual()`` (``"dual"``); ``primal_dimension`` is
    the dimension of the operator passed. ``dense`` holds the matrix when one was given.
    """

    matmul: Callable[[torch.Tensor], torch.Tensor]
    n: int
    dtype: torch.dtype
    device: torch.device
    side: str
    primal_dimension: int
    dense: torch.Tensor | None = None

    @property
    def extra_zeros(self) -> int:
        return self.primal_dimension - self.n


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype
    except TypeError as exc:
        raise TypeError(f"unsupported operator dtype {dtype!r}") from exc


def _square_dim(shape: Any, what: str) -> int:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"expected a square operator of shape (n, n), got {what} of shape {shape}")
    return shape[0]


def _from_dense(A: torch.Tensor) -> tuple[Callable, int, torch.dtype, torch.device, torch.Tensor]:
    n = _square_dim(A.shape, "a tensor")
    if A.is_complex() or not A.is_floating_point():
        raise ValueError(f"expected a real floating-point symmetric matrix, got dtype {A.dtype}")
    A = A.detach()
    scale = float(A.abs().max()) if A.numel() else 0.0
    asym = float((A - A.mT).abs().max()) if A.numel() else 0.0
    if not math.isfinite(scale):
        raise ValueError("expected a finite matrix, got non-finite entries")
    if asym > math.sqrt(torch.finfo(A.dtype).eps) * scale:
        raise ValueError(f"expected a symmetric matrix, got max |A - Aᵀ| = {asym:.3e} "
                         f"(max |A| = {scale:.3e}); symmetrise it with (A + A.T) / 2 if intended")
    return (lambda X: A @ X), n, A.dtype, A.device, A


def _from_callable(fn: Callable, n: int) -> Callable:
    mode: list[str] = []

    def matmul(X: torch.Tensor) -> torch.Tensor:
        if not mode:
            try:
                Y = fn(X)
                if isinstance(Y, torch.Tensor) and tuple(Y.shape) == tuple(X.shape):
                    mode.append("block")
                    return Y
            except (RuntimeError, ValueError, IndexError, TypeError):
                pass
            mode.append("columns")
        if mode[0] == "block":
            return fn(X)
        return torch.stack([torch.as_tensor(fn(X[:, i])).reshape(n) for i in range(X.shape[1])],
                           dim=1)

    return matmul


def _from_scipy(op: Any, n: int) -> tuple[Callable, torch.dtype]:
    dtype = _torch_dtype(op.dtype)

    def matmul(X: torch.Tensor) -> torch.Tensor:
        Y = op.matmat(X.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(Y), dtype=X.dtype).reshape(X.shape)

    return matmul, dtype


_SYMMETRY_RTOL = 1e-4


def _check_symmetric(matmul: Callable, n: int, dtype: torch.dtype, what: str) -> None:
    """Refuse an operator that is clearly not symmetric: ``xᵀ(A y)`` against ``yᵀ(A x)`` for
    two random vectors (one call of two products), relative to ``||x|| ||A y|| + ||y|| ||A x||``.
    The tolerance, ``1e-4``, passes operators that are symmetric up to float32 rounding and
    refuses a generic non-symmetric matrix (relative asymmetry about ``1 / sqrt(n)``)."""
    X = torch.randn(n, 2, generator=torch.Generator().manual_seed(12345), dtype=torch.float64)
    Y = torch.as_tensor(matmul(X.to(dtype))).to(torch.float64).reshape(n, 2)
    if not bool(torch.isfinite(Y).all()):
        return  # non-finite products are reported where they are used
    a, b = float(X[:, 0] @ Y[:, 1]), float(X[:, 1] @ Y[:, 0])
    scale = float(X[:, 0].norm() * Y[:, 1].norm() + X[:, 1].norm() * Y[:, 0].norm())
    if abs(a - b) > _SYMMETRY_RTOL * scale:
        raise ValueError(
            f"expected a symmetric operator, but {what} is not: for random x, y, "
            f"xᵀ(A y) = {a:.6g} and yᵀ(A x) = {b:.6g} (relative difference "
            f"{abs(a - b) / max(scale, 1e-300):.2g} > {_SYMMETRY_RTOL:g}); the spectral routines "
            f"need A = Aᵀ (symmetrise it as (A + Aᵀ)/2 if that is what you mean)")


def _from_sparse(op: Any) -> tuple[Callable, int, torch.dtype]:
    n = _square_dim(op.shape, "a scipy.sparse matrix")
    dtype = _torch_dtype(op.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"expected a real floating-point symmetric matrix, got dtype {op.dtype}")
    scale = float(abs(op).max()) if op.nnz else 0.0
    asym = float(abs(op - op.T).max()) if op.nnz else 0.0
    if not math.isfinite(scale):
        raise ValueError("expected a finite matrix, got non-finite entries")
    if asym > math.sqrt(torch.finfo(dtype).eps) * scale:
        raise ValueError(f"expected a symmetric matrix, got max |A - Aᵀ| = {asym:.3e} "
                         f"(max |A| = {scale:.3e}) in a scipy.sparse matrix")
    csr = op.tocsr()

    def matmul(X: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(np.asarray(csr @ X.detach().cpu().numpy()), dtype=X.dtype)

    return matmul, n, dtype


def _coerce_one(op: Any) -> tuple[Callable, int, torch.dtype, torch.device, torch.Tensor | None]:
    import scipy.sparse

    if isinstance(op, Operator):
        return op.matmul, op.n, op.dtype, op.device, op.dense
    if isinstance(op, np.ndarray):
        op = torch.from_numpy(op)
    if isinstance(op, torch.Tensor):
        return _from_dense(op)
    if scipy.sparse.issparse(op):
        mm, n, dtype = _from_sparse(op)
        return mm, n, dtype, torch.device("cpu"), None
    if isinstance(op, tuple):
        if len(op) != 2 or not callable(op[0]) or not isinstance(op[1], (int, np.integer)):
            raise TypeError("expected a tuple (matvec, n) with a callable and an int dimension")
        n = int(op[1])
        if n < 1:
            raise ValueError(f"expected a positive dimension n, got {n}")
        mm = _from_callable(op[0], n)
        _check_symmetric(mm, n, torch.float64, "the matvec")
        return mm, n, torch.float64, torch.device("cpu"), None
    if hasattr(op, "matmat") and hasattr(op, "shape") and hasattr(op, "dtype") \
            and not hasattr(op, "matmul"):
        n = _square_dim(op.shape, "a scipy LinearOperator")
        mm, dtype = _from_scipy(op, n)
        _check_symmetric(mm, n, dtype, "the scipy LinearOperator")
        return mm, n, dtype, torch.device("cpu"), None
    if hasattr(op, "shape") and callable(getattr(op, "matmul", None)):
        n = _square_dim(op.shape, type(op).__name__)
        dtype = getattr(op, "dtype", torch.float64)
        dtype = dtype if isinstance(dtype, torch.dtype) else _torch_dtype(dtype)
        device = torch.device(getattr(op, "device", None) or "cpu")
        return op.matmul, n, dtype, device, None
    raise TypeError(
        "expected a symmetric operator: a torch.Tensor [n, n], a linear_operator.LinearOperator "
        "(or any object with .shape and .matmul), a scipy.sparse.linalg.LinearOperator, or a "
        f"tuple (matvec, n); got {type(op).__name__}")


def as_operator(op: Any, side: str = "auto") -> Operator:
    """Reduce any accepted operator form to an :class:`Operator` (one place for coercion).

    Parameters
    ----------
    op :
        See the module docstring for the accepted forms.
    side : {"auto", "primal", "dual"}
        For operators with a ``.dual()`` method: ``"auto"`` picks the smaller side, ``"primal"``
        the operator itself, ``"dual"`` its dual. Other operators only have ``"primal"``.
    """
    if side not in ("auto", "primal", "dual"):
        raise ValueError(f"expected side in ('auto', 'primal', 'dual'), got {side!r}")
    if isinstance(op, Operator):
        return op
    mm, n, dtype, device, dense = _coerce_one(op)
    has_dual = callable(getattr(op, "dual", None)) and not isinstance(op, (torch.Tensor, tuple))
    if side == "dual" and not has_dual:
        raise ValueError(f"side='dual' needs an operator with a .dual() method; "
                         f"{type(op).__name__} has none")
    if getattr(op, "distributed", False) and getattr(op, "_side", "") == "primal":
        if side == "primal":
            raise ValueError("this StateNTK is split over the ranks of a process group: its "
                             "spectrum is computed on K.dual() (the same G on every rank); "
                             "pass K.dual() to get parameter-space eigenvectors")
        side = "dual"
    total = int(getattr(op, "total_states", n))  # M over the ranks of a process group
    if has_dual and side != "primal":
        dual = op.dual()
        dmm, dn, ddtype, ddevice, _ = _coerce_one(dual)
        if side == "dual" or dn < n:
            return Operator(dmm, dn, ddtype, device=ddevice, side="dual", primal_dimension=total)
    return Operator(mm, n, dtype, device=device, side="primal", primal_dimension=total, dense=dense)


def _seed_of(generator: torch.Generator | None) -> tuple[torch.Generator, int]:
    if generator is None:
        return torch.Generator().manual_seed(_DEFAULT_SEED), _DEFAULT_SEED
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"expected a torch.Generator, got {type(generator).__name__}")
    return generator, int(generator.initial_seed())


def _work_device(A: Operator) -> torch.device:
    return A.device if A.device.type in ("cpu", "cuda") else torch.device("cpu")


# ------------------------------------------------------------------------------------------
# Extreme eigenpairs
# ------------------------------------------------------------------------------------------
def eigsh(op: Any, k: int = 10, which: str = "LA", tol: float = 1e-6, *, ncv: int | None = None,
          max_restarts: int = 200, block_size: int | None = None,
          return_eigenvectors: bool = False, generator: torch.Generator | None = None,
          v0: torch.Tensor | None = None, side: str = "auto",
          null_rtol: float | None = None, dense_max: int | None = None,
          raise_on_failure: bool = False, verify: bool = True) -> EigshResult:
    """Extreme eigenpairs of a symmetric operator by thick-restart (block) Lanczos.

    Solves ``A y = θ y`` for the ``k`` largest (``which="LA"``), largest-magnitude (``"LM"``)
    or smallest *nonzero* (``"SA"``, positive semi-definite operators) eigenvalues, each Ritz
    pair to ``||A y - θ y|| <= tol * max(|θ|, eps ||A||)`` (the eigenvalue itself is
    then typically accurate to ``tol²`` relative for well-separated eigenvalues).

    Parameters
    ----------
    op :
        Any accepted operator form (see :func:`as_operator`).
    k : int
        Number of eigenpairs.
    which : {"LA", "SA", "LM"}
    tol : float
        Relative residual tolerance.
    ncv : int, optional
        Basis size (memory ``8 n (ncv + b)`` bytes); default ``max(2k + 2b, 20 + b, k + 6b)``.
    max_restarts : int
        Restart cycles before returning with ``status=MAX_ITERATIONS``.
    block_size : int, optional
        Vectors per operator call (default 1). A block ``b`` costs more products per cycle but
        fewer calls, and resolves eigenvalues of multiplicity up to ``b``; worth it when a block
        costs much less than ``b`` products (the sNTK shares its passes over a block).
    return_eigenvectors : bool
        For a ``StateNTK`` split over a process group (``K`` itself, not ``K.dual()``), the
        eigenvectors are ``J x / sqrt(λ)`` from those of ``G`` on this rank's rows (each rank
        its slice of the ``M``-vectors), with residuals ``‖K y − λ y‖`` over all ranks.
    generator : torch.Generator, optional
        Random start and fresh directions; default a generator seeded with 0 (deterministic).
    v0 : Tensor [n] or [n, p], optional
        Warm start, e.g. the eigenvectors of a previous call (on the same side).
    side : {"auto", "primal", "dual"}
        See :func:`as_operator`. With ``return_eigenvectors=True`` or a ``v0``, ``"auto"`` keeps
        the operator passed (``"primal"``), so that eigenvectors and warm starts live in its
        space (for the sNTK ``K``: pass ``K.dual()`` to get parameter-space eigenvectors of
        ``G``); otherwise it works on the smaller side (same eigenvalues, ``null_dim`` adjusted).
    null_rtol : float, optional
        ``which="SA"``: Ritz values ``<= null_rtol * λ_max`` count as the null space. Default
        ``1000 eps`` of the operator's dtype (``2.2e-13`` in float64, ``1.2e-4`` in float32).
    dense_max : int, optional
        Problems with ``n <= max(dense_max, ncv + b)`` are solved exactly from the dense matrix
        (``n`` products in blocks of 64, then ``eigh``). Default 1024 for ``"SA"`` (Lanczos
        needs about ``sqrt(λ_max / gap)`` steps per digit at the small end of an ill-conditioned
        spectrum, like the sNTK's), 0 otherwise.
    raise_on_failure : bool
        Raise :class:`NoConvergence` (carrying the partial result) instead of returning a result
        whose ``status`` is not ``CONVERGED``.
    verify : bool
        ``which="LA"``/``"LM"``: after convergence, deflate the pairs found and run a short
        Lanczos from a fresh random start on the rest; an eigenvalue there at or beyond the
        ``k``-th (a missed copy of a repeated eigenvalue, which single-vector Lanczos cannot
        see) joins the result by a Rayleigh–Ritz step, and the check repeats
        (:func:`lanczos_ntk.linalg.complete_multiplicities`). Costs one short run (a few tens
        of products) when nothing was missed.

    Returns
    -------
    EigshResult

    Notes
    -----
    Cost: about ``ncv`` products per restart cycle; the ``O(n ncv²)`` reorthogonalisation per
    cycle is usually far cheaper than the products for the sNTK. References: Lanczos (1950);
    Paige (1972); Wu & Simon (2000).

    Examples
    --------
    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> r = eigsh(A, k=3, tol=1e-10)
    >>> r.eigenvalues.round(decimals=6).tolist(), r.status.value
    ([100.0, 99.0, 98.0], 'converged')
    """
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"expected which in ('LA', 'SA', 'LM'), got {which!r}")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"expected a positive integer k, got {k!r}")
    if not tol > 0:
        raise ValueError(f"expected tol > 0, got {tol!r}")
    if side == "auto" and (return_eigenvectors or v0 is not None):
        side = "primal"
    if return_eigenvectors and v0 is None and side == "primal" and \
            getattr(op, "distributed", False) and getattr(op, "_side", "") == "primal":
        return _split_primal_eigenvectors(
            op, eigsh(op.dual(), k, which, tol, ncv=ncv, max_restarts=max_restarts,
                      block_size=block_size, return_eigenvectors=True, generator=generator,
                      side="primal", null_rtol=null_rtol, dense_max=dense_max,
                      raise_on_failure=raise_on_failure, verify=verify))
    A = as_operator(op, side)
    if k > A.n:
        warnings.warn(f"eigsh: k={k} exceeds the dimension n={A.n} of the {A.side} side; "
                      f"returning all its eigenvalues from a dense solve ({A.n} products)",
                      UserWarning, stacklevel=2)
        k, dense_max = A.n, A.n
    b = 1 if block_size is None else int(block_size)
    if b < 1 or b > A.n:
        raise ValueError(f"expected 1 <= block_size <= {A.n}, got {block_size!r}")
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != A.n:
            got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
            raise ValueError(f"expected v0 of shape [{A.n}] or [{A.n}, p] (the {A.side} side), "
                             f"got {got}")
    gen, seed = _seed_of(generator)
    dev = _work_device(A)
    out = linalg.thick_restart_lanczos(
        A.matmul, A.n, int(k), which=which, tol=float(tol), ncv=ncv, max_restarts=max_restarts,
        block_size=b, v0=v0, generator=gen, dtype=A.dtype, device=dev, null_rtol=null_rtol,
        return_eigenvectors=return_eigenvectors or verify, dense_max=dense_max)
    values, vectors, residuals, converged = out.eigenvalues, out.eigenvectors, out.residuals, \
        out.converged
    status = Status(out.status)
    matvecs, matmuls, missed = out.num_matvecs, out.num_matmuls, 0
    iterative = out.ncv < A.n  # the dense solve finds every copy
    if verify and iterative and which != "SA" and len(values) and \
            status in (Status.CONVERGED, Status.ACCURACY_LIMITED):
        done = linalg.complete_multiplicities(
            A.matmul, A.n, values, vectors, residuals, which=which, tol=float(tol),
            anorm=out.lambda_max, generator=gen, dtype=A.dtype, device=dev)
        values, vectors, residuals, converged = done.eigenvalues, done.eigenvectors, \
            done.residuals, done.converged
        matvecs, matmuls, missed = matvecs + done.num_matvecs, matmuls + done.num_matmuls, \
            done.missed
        if missed:
            status = Status(done.status)
    null_dim = None
    if out.null_dim is not None:
        null_dim = max(0, out.null_dim + A.extra_zeros)
    result = EigshResult(
        eigenvalues=values, eigenvectors=vectors if return_eigenvectors else None,
        residuals=residuals, converged=converged, status=status, k=int(k), which=which,
        tol=float(tol), null_dim=null_dim, lambda_max=out.lambda_max,
        num_matvecs=matvecs, num_matmuls=matmuls,
        num_restarts=out.num_restarts, block_size=b, ncv=out.ncv, side=A.side, dimension=A.n,
        primal_dimension=A.primal_dimension, dtype=str(A.dtype).removeprefix("torch."),
        device=str(A.device), seed=seed, missed_copies=missed)
    if raise_on_failure and result.status != Status.CONVERGED:
        raise NoConvergence(
            f"eigsh: {int(result.converged.sum())} of {k} eigenpairs converged to tol={tol:g} "
            f"after {result.num_restarts} restarts ({result.status.value}); raise max_restarts "
            f"or ncv, or loosen tol", result)
    return result


def _split_primal_eigenvectors(K: Any, dual: EigshResult) -> EigshResult:
    """Eigenpairs of a ``K`` split over a process group, from those of ``G = K.dual()``:
    ``y = J x / sqrt(λ)`` on this rank's rows, with the true residuals ``‖K y − λ y‖`` over all
    ranks (``K y − λ y = J (G x − λ x) / sqrt(λ)``: one block product on each side)."""
    lam, X = dual.eigenvalues, dual.eigenvectors
    scale = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()
    Y = K.jvp(X) / scale
    R = K.jvp(K.dual().matmul(X) - X * lam) / scale
    sq = (R * R).sum(dim=0)
    torch.distributed.all_reduce(sq, group=K.engine.group)
    residuals = sq.sqrt().to(dual.residuals.dtype)
    return dataclasses.replace(dual, eigenvectors=Y, residuals=residuals, side="primal",
                               dimension=int(K.total_states),
                               num_matvecs=dual.num_matvecs + len(lam))


def condition_number(op: Any, *, tol: float = 1e-6, side: str = "auto",
                     generator: torch.Generator | None = None, null_rtol: float | None = None,
                     ncv: int | None = None, max_restarts: int = 200,
                     dense_max: int | None = None) -> ConditionNumber:
    """Condition number ``λ_max / λ_min`` of the nonzero part of a PSD operator.

    Two :func:`eigsh` runs (``which="LA"`` and ``which="SA"``, ``k=1``); eigenvalues below
    ``null_rtol * λ_max`` are the null space and excluded. ``value`` is ``inf`` when no nonzero
    eigenvalue was found. Cost: two eigsh runs (the SA one dominates for large ``κ``, roughly
    ``sqrt(κ)`` products per digit; below ``dense_max`` it is a dense ``eigh``).
    """
    A = as_operator(op, side)
    gen, _ = _seed_of(generator)
    hi = eigsh(A, 1, "LA", tol, generator=gen, ncv=ncv, max_restarts=max_restarts)
    lo = eigsh(A, 1, "SA", tol, generator=gen, ncv=ncv, max_restarts=max_restarts,
               null_rtol=null_rtol, dense_max=dense_max)
    lmax = float(hi.eigenvalues[0])
    lmin = float(lo.eigenvalues[0]) if len(lo.eigenvalues) else 0.0
    value = lmax / lmin if lmin > 0 else math.inf
    ok = hi.status == Status.CONVERGED and lo.status == Status.CONVERGED
    return ConditionNumber(
        value=value, lambda_max=lmax, lambda_min=lmin, null_dim=lo.null_dim,
        status=Status.CONVERGED if ok else Status.MAX_ITERATIONS,
        num_matvecs=hi.num_matvecs + lo.num_matvecs, side=A.side,
        primal_dimension=A.primal_dimension)


# ------------------------------------------------------------------------------------------
# Stochastic Lanczos quadrature and what follows from it
# ------------------------------------------------------------------------------------------
def slq(op: Any, num_probes: int = 32, num_steps: int = 80, *, probe: str = "rademacher",
        generator: torch.Generator | None = None, side: str = "auto",
        reorthogonalize: bool | str = "auto") -> SLQResult:
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
    q = linalg.lanczos_quadrature(A.matmul, A.n, int(num_probes), int(num_steps), probe=probe,
                                  generator=gen, dtype=A.dtype, device=_work_device(A),
                                  reorthogonalize=reorthogonalize)
    return SLQResult(
        nodes=q.nodes, weights=q.weights, dimension=A.n, primal_dimension=A.primal_dimension,
        side=A.side, num_probes=int(num_probes), num_steps=int(q.nodes.shape[1]), probe=probe,
        reorthogonalize=reorthogonalize, num_matvecs=q.num_matvecs, breakdowns=q.breakdowns,
        status=Status.CONVERGED, dtype=str(A.dtype).removeprefix("torch."),
        device=str(A.device), seed=seed, alpha=q.alpha, beta=q.beta)


def _check_slq(result: Any):
    if not (isinstance(result, SLQResult) or _is_deflated(result)):
        raise TypeError(f"expected an SLQResult from lanczos_ntk.slq or a DeflatedSLQ from "
                        f"lanczos_ntk.deflated_slq, got {type(result).__name__}")
    return result


def _is_deflated(result: Any) -> bool:
    from ._deflated import DeflatedSLQ

    return isinstance(result, DeflatedSLQ)


def _apply(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    vals = f(x)
    if not isinstance(vals, torch.Tensor) or vals.shape != x.shape:
        raise ValueError("expected f to map a tensor of nodes elementwise to a tensor of the "
                         "same shape")
    return vals.to(torch.float64)


def _f_at_zero(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    return float(_apply(f, torch.zeros(1, dtype=torch.float64))[0])


_TOO_FEW_RTOL = 0.05  # a last-step change above 5% of the value: too few Lanczos steps


def _quad_status(change: float, value: float) -> Status:
    return Status.TOO_FEW_STEPS if change > _TOO_FEW_RTOL * abs(value) else Status.CONVERGED


def _combine(se: float, err: float) -> float:
    if math.isinf(err):
        return math.inf
    return math.hypot(se, err) if math.isfinite(se) else (err if err > 0 else se)


def tr_f(result: Any, f: Callable[[torch.Tensor], torch.Tensor], *,
         degree: int | None = None) -> TraceResult:
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
    return TraceResult(estimate=est, standard_error=_combine(se, err), method=_method_of(result),
                       num_matvecs=0, side=result.side, dimension=result.dimension,
                       primal_dimension=result.primal_dimension, seed=result.seed,
                       quadrature_error=err, status=_quad_status(err, est))


def _method_of(result: Any) -> str:
    return "deflated-slq" if _is_deflated(result) else "slq"


def trace_from_slq(result: Any) -> TraceResult:
    """``tr A`` from an SLQ result (for Rademacher probes: Hutchinson with the same probes),
    never below the largest eigenvalue known (the top node, or the deflated ``λ_max``)."""
    r = tr_f(result, lambda x: x, degree=1)
    floor = result.lambda_max if _is_deflated(result) else 0.0
    return dataclasses.replace(r, estimate=max(r.estimate, floor))


def _zero_cut(result: Any, zero_rtol: float) -> float:
    return zero_rtol * max(float(result.lambda_max), 0.0)


def _measure(result: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All nodes with their weights in eigenvalues per node, averaged over probes, plus the
    per-probe (structural + quadrature) counts: ``(x, w, per_probe_weights [s, m])``."""
    if _is_deflated(result):
        rem = result.remainder
        x = torch.cat([result.top, rem.nodes.flatten()])
        w = torch.cat([torch.ones_like(result.top),
                       (rem.weights * rem.dimension / rem.num_probes).flatten()])
        return x, w, rem
    return result.nodes.flatten(), (result.weights * result.dimension
                                    / result.num_probes).flatten(), result


def _count_bound(quad: SLQResult, cut: float) -> float:
    """Chebyshev–Markov–Stieltjes: the distribution function of probe ``p``'s measure at
    ``cut`` lies between the quadrature's count without and with the nodes bracketing ``cut``;
    return ``n`` times the mean over probes of the larger bracketing weight."""
    order = torch.argsort(quad.nodes, dim=1)
    nodes = torch.gather(quad.nodes, 1, order)
    weights = torch.gather(quad.weights, 1, order)
    m = nodes.shape[1]
    i = (nodes <= cut).sum(dim=1)  # nodes at or below the cut
    padded = torch.cat([torch.zeros_like(weights[:, :1]), weights,
                        torch.zeros_like(weights[:, :1])], dim=1)
    rows = torch.arange(nodes.shape[0])
    below, above = padded[rows, i], padded[rows, torch.clamp(i + 1, max=m + 1)]
    return quad.dimension * float(torch.maximum(below, above).mean())


def spectral_density(result: Any, grid: torch.Tensor | None = None,
                     sigma: float | None = None, *, num_points: int = 512,
                     zero_rtol: float = ZERO_RTOL, scale: str = "linear") -> SpectralDensity:
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
    zero_per_probe = (result.extra_zeros + zero_top + quad.dimension
                      * (quad.weights * (quad.nodes <= cut)).sum(dim=1)) / N
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
    return SpectralDensity(grid=grid, density=density, zero_mass=zero_mass, zero_mass_se=zero_se,
                           zero_threshold=cut, sigma=float(sigma), scale=scale, side=result.side,
                           dimension=result.dimension, primal_dimension=N, zero_mass_bound=bound)


def _delta_se(samples: torch.Tensor, grad: torch.Tensor) -> float:
    """Delta-method standard error of ``g(mean)`` from per-probe samples ``[s, d]``."""
    s = samples.shape[0]
    if s < 2:
        return math.nan
    cov = torch.cov(samples.T).reshape(samples.shape[1], samples.shape[1]) / s
    return float(torch.sqrt(torch.clamp(grad @ cov @ grad, min=0.0)))


def _xlogx(x: torch.Tensor) -> torch.Tensor:
    xp = torch.clamp(x, min=0.0)
    return torch.where(xp > 0, xp * torch.log(torch.where(xp > 0, xp, torch.ones_like(xp))),
                       torch.zeros_like(xp))


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _square(x: torch.Tensor) -> torch.Tensor:
    return x * x


def _rank_from_quadrature(r: Any, kind: str, rtol: float, lambda_max: float | None
                          ) -> tuple[float, float, float]:
    """``(value, standard error, quadrature error)`` of an effective rank from a quadrature
    result. Values are clamped to what a PSD spectrum allows (``[1, n]`` when ``A != 0``)."""
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


def effective_rank(op_or_result: Any, kind: str = "participation", *, rtol: float = ZERO_RTOL,
                   num_probes: int = 32, num_steps: int = 80,
                   generator: torch.Generator | None = None, side: str = "auto",
                   tol: float = 1e-6, deflate: bool = True) -> EffectiveRank:
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
            from ._deflated import deflated_slq

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
    return EffectiveRank(value=value, standard_error=se, kind=kind, method=method,
                         num_matvecs=matvecs, side=r.side, primal_dimension=r.primal_dimension,
                         seed=r.seed, quadrature_error=err, status=_quad_status(err, value))


# ------------------------------------------------------------------------------------------
# Trace
# ------------------------------------------------------------------------------------------
def trace(op: Any, method: str = "hutch++", num_matvecs: int = 60, *,
          probe: str = "rademacher", generator: torch.Generator | None = None,
          side: str = "auto") -> TraceResult:
    """Trace of a symmetric operator: exact, Hutchinson, or Hutch++.

    * ``"exact"``: ``Σ_i e_iᵀ A e_i`` with ``n`` products in blocks of 64 (the diagonal directly
      for a dense tensor); standard error 0.
    * ``"hutchinson"``: ``(1/s) Σ v_iᵀ A v_i`` with ``s = num_matvecs`` probes (Hutchinson 1989).
    * ``"hutch++"``: exact trace on the range of ``A S`` plus Hutchinson on the deflated rest,
      budget ``num_matvecs`` split in thirds (Meyer, Musco, Musco & Woodruff 2021); the standard
      error is that of the Hutchinson part.

    The trace of the sNTK is the same on both sides, so the smaller side is used.

    Examples
    --------
    >>> A = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    >>> trace(A, "exact").estimate
    55.0
    """
    methods = ("hutch++", "hutchinson", "exact")
    if method not in methods:
        raise ValueError(f"expected method in {methods}, got {method!r}")
    A = as_operator(op, side)
    gen, seed = _seed_of(generator)
    dev = _work_device(A)
    kw = dict(side=A.side, dimension=A.n, primal_dimension=A.primal_dimension)
    if method == "exact":
        if A.dense is not None:
            return TraceResult(float(torch.diagonal(A.dense).sum()), 0.0, "exact", 0, seed=None,
                               **kw)
        total, block = 0.0, 64
        for s in range(0, A.n, block):
            E = torch.zeros(A.n, min(block, A.n - s), dtype=torch.float64, device=dev)
            E[s : s + E.shape[1]] = torch.eye(E.shape[1], dtype=torch.float64, device=dev)
            Y = A.matmul(E.to(A.dtype)).to(torch.float64)
            total += float(torch.diagonal(Y[s : s + E.shape[1]]).sum())
        return TraceResult(total, 0.0, "exact", A.n, seed=None, **kw)
    fn = linalg.hutchpp if method == "hutch++" else linalg.hutchinson
    t = fn(A.matmul, A.n, int(num_matvecs), probe=probe, generator=gen, dtype=A.dtype, device=dev)
    return TraceResult(t.estimate, t.standard_error, method, t.num_matvecs, seed=seed, **kw)
