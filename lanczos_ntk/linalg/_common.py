"""Shared helpers of the Krylov routines: warnings, matvec casting, random blocks."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["Matmul", "NumericalWarning", "as_work", "random_block"]

Matmul = Callable[[torch.Tensor], torch.Tensor]
"""A symmetric operator given as a closure ``X [n, k] -> A @ X [n, k]``."""

WORK_DTYPE = torch.float64

#: Reorthogonalisation: a second Gram–Schmidt pass only when the first left less than this
#: fraction of a vector's norm (took more than half of its squared norm; Daniel, Gragg,
#: Kaufman & Stewart 1976); otherwise one pass leaves it orthogonal to working accuracy.
DGKS_ETA = 1.0 / math.sqrt(2.0)


def reorthogonalize(W: torch.Tensor, project_out: Callable[[torch.Tensor], torch.Tensor]):
    """Gram–Schmidt of the columns of ``W`` against a basis, in place: one pass of
    ``project_out`` (which subtracts the components and returns their coefficients), and a
    second for all columns when any kept less than :data:`DGKS_ETA` of its norm. Returns the
    coefficients summed over the passes and the columns' norms after.
    """
    before = torch.linalg.vector_norm(W, dim=0)
    H = project_out(W)
    after = torch.linalg.vector_norm(W, dim=0)
    if bool((after < DGKS_ETA * before).any()):
        H = H + project_out(W)
        after = torch.linalg.vector_norm(W, dim=0)
    return H, after


class NumericalWarning(UserWarning):
    """A numerical difficulty the result survived but the caller may want to know about."""


def finfo_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float64 for anything else)."""
    return torch.finfo(dtype if dtype.is_floating_point else WORK_DTYPE).eps


def as_work(mv: Matmul, dtype: torch.dtype, device: torch.device | str) -> Matmul:
    """Wrap ``mv`` so it takes and returns float64 on ``device``, calling it in ``dtype``."""

    def work(X: torch.Tensor) -> torch.Tensor:
        # a contiguous copy: the caller's basis must survive a matvec that returns or edits its
        # input, and a matvec may view its input as it likes
        Y = mv(X.to(dtype=dtype, device=device, copy=True, memory_format=torch.contiguous_format))
        if not isinstance(Y, torch.Tensor):
            raise TypeError(f"the matvec returned {type(Y).__name__}, expected a torch.Tensor")
        if Y.shape != X.shape:
            raise ValueError(
                f"the matvec mapped a block of shape {tuple(X.shape)} to "
                f"{tuple(Y.shape)}; expected the same shape"
            )
        return Y.to(dtype=WORK_DTYPE, device=X.device)

    return work


def random_block(
    n: int, k: int, generator: torch.Generator | None, device, kind: str = "gaussian"
) -> torch.Tensor:
    """A float64 ``[n, k]`` block of Gaussian or Rademacher entries drawn on the CPU."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if kind == "gaussian":
        X = torch.randn(n, k, generator=generator, dtype=WORK_DTYPE, device=gen_device)
    elif kind == "rademacher":
        X = torch.randint(0, 2, (n, k), generator=generator, device=gen_device).to(WORK_DTYPE)
        X = 2.0 * X - 1.0
    else:
        raise ValueError(f"expected probe='rademacher' or 'gaussian', got {kind!r}")
    return X.to(device)


def default_generator(generator: torch.Generator | None) -> torch.Generator:
    """``generator``, or a fresh CPU generator seeded with 0 (never the global random state)."""
    return generator if generator is not None else torch.Generator().manual_seed(0)


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    """Mean of samples and its standard error ``std / sqrt(m)`` (NaN with fewer than two)."""
    if x.numel() < 2:
        return float(x.mean()), math.nan
    return float(x.mean()), float(x.std(unbiased=True)) / math.sqrt(x.numel())


def breakdown_tol(n: int, eps: float, anorm: float) -> float:
    """Threshold below which a new Lanczos direction is rounding noise: ``10 sqrt(n) eps ||A||``."""
    return 10.0 * math.sqrt(max(n, 1)) * eps * anorm
