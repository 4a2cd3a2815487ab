"""Operators in any accepted form, coerced to one matvec closure, and the side (``K`` or its
dual) to work on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

_DEFAULT_SEED = 0


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
        raise ValueError(
            f"expected a symmetric matrix, got max |A - Aᵀ| = {asym:.3e} "
            f"(max |A| = {scale:.3e}); symmetrise it with (A + A.T) / 2 if intended"
        )
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
        return torch.stack([torch.as_tensor(fn(X[:, i])).reshape(n) for i in range(X.shape[1])], dim=1)

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
    refuses a generic non-symmetric matrix (relative asymmetry about ``1 / sqrt(n)``).
    """
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
            f"need A = Aᵀ (symmetrise it as (A + Aᵀ)/2 if that is what you mean)"
        )


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
        raise ValueError(
            f"expected a symmetric matrix, got max |A - Aᵀ| = {asym:.3e} "
            f"(max |A| = {scale:.3e}) in a scipy.sparse matrix"
        )
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
    if hasattr(op, "matmat") and hasattr(op, "shape") and hasattr(op, "dtype") and not hasattr(op, "matmul"):
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
        f"tuple (matvec, n); got {type(op).__name__}"
    )


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
        raise ValueError(f"side='dual' needs an operator with a .dual() method; {type(op).__name__} has none")
    if getattr(op, "distributed", False) and getattr(op, "_side", "") == "primal":
        if side == "primal":
            raise ValueError(
                "this StateNTK is split over the ranks of a process group: its "
                "spectrum is computed on K.dual() (the same G on every rank); "
                "pass K.dual() to get parameter-space eigenvectors"
            )
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
