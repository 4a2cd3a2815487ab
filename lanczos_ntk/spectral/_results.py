"""The result objects of the spectral estimates."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch

from .._results import Result, Status


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

    @classmethod
    def from_quadrature(
        cls,
        q: Any,
        *,
        dimension: int,
        primal_dimension: int,
        side: str,
        num_probes: int,
        probe: str,
        reorthogonalize: bool,
        dtype: torch.dtype,
        device: Any,
        seed: int | None,
    ) -> SLQResult:
        """The result of :func:`lanczos_ntk.linalg.lanczos_quadrature`'s nodes ``q`` on an
        operator with these dimensions, side, dtype and device.
        """
        return cls(
            nodes=q.nodes,
            weights=q.weights,
            dimension=int(dimension),
            primal_dimension=int(primal_dimension),
            side=side,
            num_probes=int(num_probes),
            num_steps=int(q.nodes.shape[1]),
            probe=probe,
            reorthogonalize=bool(reorthogonalize),
            num_matvecs=q.num_matvecs,
            breakdowns=q.breakdowns,
            status=Status.CONVERGED,
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            seed=seed,
            alpha=q.alpha,
            beta=q.beta,
        )

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

    def quadrature_change(
        self, f: Callable[[torch.Tensor], torch.Tensor], degree: int | None = None
    ) -> float:
        """How much the last Lanczos step moved the estimate of ``tr f``: the mean over probes of
        the ``m``-step minus the ``(m-1)``-step quadrature (Gauss quadrature converges fast, so
        this over-states the error of the ``m``-step rule). ``0`` for a polynomial ``f`` of
        ``degree < 2m`` (exact), ``inf`` when it cannot be told (``m = 1``, or no recurrences).
        """
        m = self.nodes.shape[1]
        if degree is not None and degree < 2 * m:
            return 0.0
        if m < 2 or self.alpha is None or self.beta is None:
            return math.inf
        T = (
            torch.diag_embed(self.alpha[:, : m - 1])
            + torch.diag_embed(self.beta[:, : m - 2], 1)
            + torch.diag_embed(self.beta[:, : m - 2], -1)
        )
        theta, S = torch.linalg.eigh(T)
        w = S[:, 0, :] ** 2 * self.weights.sum(dim=1, keepdim=True)
        prev = self.dimension * (w * _apply(f, theta)).sum(dim=1)
        return abs(float((self.samples(f) - prev).mean()))

    def square_bounds(self, t1: float) -> tuple[float, float]:
        """Bounds on the stochastic part of ``tr A²`` given that of ``tr A``:
        ``tr(A)² / n <= tr A²`` (Cauchy–Schwarz); no useful upper bound.
        """
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
    is ``TOO_FEW_STEPS`` when that change exceeds 5% of the estimate.
    """

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
    :class:`EigshResult` (Ritz pairs, residuals and the ``converged`` mask).
    """

    def __init__(self, message: str, result: EigshResult):
        super().__init__(message)
        self.result = result


def _apply(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    vals = f(x)
    if not isinstance(vals, torch.Tensor) or vals.shape != x.shape:
        raise ValueError("expected f to map a tensor of nodes elementwise to a tensor of the same shape")
    return vals.to(torch.float64)


def _f_at_zero(f: Callable[[torch.Tensor], torch.Tensor]) -> float:
    return float(_apply(f, torch.zeros(1, dtype=torch.float64))[0])
