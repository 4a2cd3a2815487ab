"""Helpers shared by the test modules (``from tests.helpers import gen, inputs, with_spectrum``)."""

from __future__ import annotations

import torch

from lanczos_ntk.testing import matrix_with_spectrum

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def with_spectrum(lam, seed: int = 0) -> torch.Tensor:
    """``Q diag(lam) Qᵀ`` with a random orthogonal ``Q`` (see lanczos_ntk.testing)."""
    return matrix_with_spectrum(lam, gen(seed))


def inputs(B: int = 3, T: int = 4, d: int = 2, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    """Float64 inputs ``[B, T, d]``, Gaussian times ``scale``."""
    return scale * torch.randn(B, T, d, generator=gen(seed), dtype=F64)
