"""Randomised trace estimators with standard errors."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import WORK_DTYPE, Matmul, as_work, default_generator, mean_se, random_block

__all__ = ["TraceEstimate", "hutchinson", "hutchpp"]


class TraceEstimate(NamedTuple):
    """``estimate`` of ``tr A`` with the ``standard_error`` of its stochastic part."""

    estimate: float
    standard_error: float
    num_matvecs: int
    samples: torch.Tensor


def hutchinson(
    matmul: Matmul,
    n: int,
    num_matvecs: int,
    *,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = WORK_DTYPE,
    device=None,
) -> TraceEstimate:
    """Hutchinson's estimator ``tr A ≈ (1/s) Σ_i v_iᵀ A v_i`` with ``s`` random probes.

    Unbiased; for Rademacher probes the variance is ``2 (||A||_F² - Σ A_ii²) / s``. The standard
    error is the sample standard deviation of ``v_iᵀ A v_i`` over ``sqrt(s)``. Cost: ``s``
    products in one call. Reference: Hutchinson (1989).
    """
    if num_matvecs < 1:
        raise ValueError(f"expected num_matvecs >= 1, got {num_matvecs}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = default_generator(generator)
    V = random_block(n, num_matvecs, generator, device, probe)
    samples = (V * as_work(matmul, dtype, device)(V)).sum(dim=0).cpu()
    est, se = mean_se(samples)
    return TraceEstimate(est, se, num_matvecs, samples)


def hutchpp(
    matmul: Matmul,
    n: int,
    num_matvecs: int,
    *,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    dtype: torch.dtype = WORK_DTYPE,
    device=None,
) -> TraceEstimate:
    """Hutch++: ``tr A ≈ tr(Qᵀ A Q) + (1/s) Σ_i g_iᵀ (I - QQᵀ) A (I - QQᵀ) g_i``.

    With a budget of ``N`` products, ``Q`` is an orthonormal basis of ``A S`` for ``N/3`` random
    probes ``S`` (captures the top of the spectrum exactly), and Hutchinson with ``s = N/3``
    probes ``g_i`` handles the deflated rest. The standard error is that of the Hutchinson part
    (the deflated part is deterministic given ``Q``). Relative error ``O(1/N)`` for PSD ``A``
    against ``O(1/sqrt(N))`` for Hutchinson. Cost: ``N`` products in three calls.
    Reference: Meyer, Musco, Musco & Woodruff (2021), "Hutch++: optimal stochastic trace
    estimation".
    """
    if num_matvecs < 3:
        raise ValueError(f"expected num_matvecs >= 3 for Hutch++, got {num_matvecs}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    generator = default_generator(generator)
    work = as_work(matmul, dtype, device)
    k = min(num_matvecs // 3, n)
    s = num_matvecs - 2 * k
    S = random_block(n, k, generator, device, probe)
    Q, _ = torch.linalg.qr(work(S))
    top = float(torch.trace(Q.T @ work(Q)))
    G = random_block(n, s, generator, device, probe)
    G = G - Q @ (Q.T @ G)
    samples = (G * work(G)).sum(dim=0).cpu()
    rest, se = mean_se(samples)
    return TraceEstimate(top + rest, se, 2 * k + s, samples)
