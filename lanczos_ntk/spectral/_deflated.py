"""Deflated stochastic Lanczos quadrature: the top of the spectrum exactly, SLQ on the rest.

Near a bifurcation the sNTK carries almost all of its trace (and more of ``tr K²``) in one or
two eigenvalues. Plain SLQ then has an enormous variance: every probe sees the big eigenvalue
through a random weight, so ``(tr K)² / tr K²`` comes out anywhere between 0.2 and 2 for a
kernel whose participation ratio is 1.0001. Deflation removes that variance: with ``U`` the
top-``k`` Ritz vectors (orthonormal) and ``P = I - UUᵀ``,

* ``tr A = tr(UᵀAU) + tr(PAP)`` and
  ``tr A² = ||UᵀAU||_F² + 2 ||P A U||_F² + tr((PAP)²)``, exactly, for *any* orthonormal ``U``;
* ``tr f(A) ≈ Σ_i f(θ_i) + tr f(PAP)|_{range(U)⊥}`` for general ``f`` (error
  ``O(||AU - UΘ||²)``, below the eigensolver's tolerance squared);

and only the remainder ``PAP``, whose largest eigenvalue is ``λ_{k+1}``, is estimated by SLQ
from probes projected onto ``range(U)⊥`` (``E[(Pg)ᵀ f(PAP) (Pg)] = tr f(PAP)|_{range(U)⊥}``).
``k`` grows (doubling from 4) until the remainder carries at most ``share_tol`` of ``tr A²``,
or deflating more stops paying, up to ``k_max``.

References: Meyer, Musco, Musco & Woodruff (2021), Hutch++ (deflation of the top for trace
estimation); Ubaru, Chen & Saad (2017), SLQ; Lin (2017), randomized estimation of spectral
densities with deflation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from .. import linalg
from .._results import Result, Status
from ._coerce import _seed_of, _work_device, as_operator
from ._eigen import eigsh
from ._results import EigshResult, SLQResult, _apply, _f_at_zero

__all__ = ["DeflatedSLQ", "deflated_slq"]

_SHARE_PROBES = 8


@dataclasses.dataclass(frozen=True)
class DeflatedSLQ(Result):
    """The top ``k`` eigenvalues of a symmetric PSD operator plus the SLQ of the rest.

    Attributes
    ----------
    top : Tensor [k] (float64, descending)
        Ritz values of ``UᵀAU`` for the deflated orthonormal block ``U``.
    top_residuals : Tensor [k]
        True residuals ``||A u_i - θ_i u_i||``.
    cross : float
        ``2 ||P A U||_F²``, the exact part of ``tr A²`` between ``range(U)`` and its complement
        (``2 Σ_i ||A u_i - θ_i u_i||²``, tiny when ``U`` is converged).
    remainder : SLQResult
        Gauss quadrature of ``PAP`` from probes projected onto ``range(U)⊥``: its
        ``samples(f)`` estimate ``Σ_{i>k} f(λ_i)`` (``dimension`` ``n``, no structural zeros).
    remainder_share : float
        Estimated share of ``tr A²`` left in the remainder when ``k`` was settled.
    history : tuple of (k, share)
        The rounds of the adaptive choice of ``k``.
    status : Status
        That of the top eigenpairs (``CONVERGED`` or ``ACCURACY_LIMITED``; the estimates stay
        valid either way: the split of ``tr A`` and ``tr A²`` is exact for any ``U``).
    """

    top: torch.Tensor
    top_residuals: torch.Tensor
    cross: float
    remainder: SLQResult
    k: int
    remainder_share: float
    history: tuple
    status: Status
    num_matvecs: int
    dimension: int
    primal_dimension: int
    side: str
    seed: int | None

    @property
    def extra_zeros(self) -> int:
        """Zero eigenvalues of the operator passed that the side worked on does not carry."""
        return self.primal_dimension - self.dimension

    @property
    def lambda_max(self) -> float:
        """The largest eigenvalue (the top Ritz value)."""
        return float(self.top[0]) if self.top.numel() else 0.0

    @property
    def num_probes(self) -> int:
        return self.remainder.num_probes

    @property
    def num_steps(self) -> int:
        return self.remainder.num_steps

    # -- the quadrature interface shared with SLQResult --------------------------------------
    def exact_part(self, f) -> float:
        """``Σ_i f(θ_i)`` over the top plus ``(N - n) f(0)`` for the structural zeros."""
        out = float(_apply(f, self.top).sum()) if self.top.numel() else 0.0
        return out + (self.extra_zeros * _f_at_zero(f) if self.extra_zeros else 0.0)

    def samples(self, f) -> torch.Tensor:
        """Per-probe estimates of ``Σ_{i>k} f(λ_i)``."""
        return self.remainder.samples(f)

    def quadrature_change(self, f, degree: int | None = None) -> float:
        return self.remainder.quadrature_change(f, degree)

    def square_bounds(self, t1: float) -> tuple[float, float]:
        """The remainder's ``tr R²`` lies in ``[t1² / (n - k), λ_{k+1} t1]`` with
        ``λ_{k+1} <= θ_k + ||r_k||``.
        """
        rest = max(self.dimension - self.k, 1)
        hi = (float(self.top[-1]) + float(self.top_residuals[-1])) * t1 if self.k else math.inf
        return t1 * t1 / rest, max(hi, t1 * t1 / rest)


def _rayleigh_ritz(work, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotate ``U`` to the Ritz vectors of ``UᵀAU``; return ``(U, AU, θ)`` (descending)."""
    AU = work(U)
    H = U.T @ AU
    theta, S = torch.linalg.eigh(0.5 * (H + H.T))
    S = S.flip(1)
    U, AU = U @ S, AU @ S
    return U, AU, (U * AU).sum(dim=0)


def deflated_slq(
    op: Any,
    num_probes: int = 32,
    num_steps: int = 80,
    *,
    k: int | None = None,
    k_max: int = 32,
    share_tol: float = 0.05,
    tol: float = 1e-6,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    side: str = "auto",
    eigenpairs: EigshResult | None = None,
) -> DeflatedSLQ:
    """Top eigenvalues exactly, stochastic Lanczos quadrature on the deflated remainder.

    Parameters
    ----------
    op :
        A symmetric positive semi-definite operator in any form :func:`lanczos_ntk.eigsh`
        accepts (the sNTK is worked on from its smaller side).
    num_probes, num_steps : int
        SLQ probes and Lanczos steps for the remainder.
    k : int, optional
        Deflate exactly this many eigenpairs. Default: adaptive, doubling from 4 (or from the
        number of ``eigenpairs`` given) until the remainder carries at most ``share_tol`` of
        ``tr A²`` (estimated from 8 Hutchinson probes, ``E ||R g||² = tr R²``), or doubling cut
        the share by less than 30% (a flat spectrum, where deflation does not help and SLQ has
        little variance anyway), or ``k_max`` is reached.
    tol : float
        Residual tolerance of the :func:`~lanczos_ntk.eigsh` runs that find ``U``.
    probe : {"rademacher", "gaussian"}
    generator : torch.Generator, optional
        Default: seeded with 0.
    side : {"auto", "primal", "dual"}
    eigenpairs : EigshResult, optional
        Top eigenpairs already computed on the same side, with eigenvectors (saves the first
        eigsh run).

    Returns
    -------
    DeflatedSLQ
        Feed it to :func:`~lanczos_ntk.effective_rank`, :func:`~lanczos_ntk.tr_f`,
        :func:`~lanczos_ntk.trace_from_slq` or :func:`~lanczos_ntk.spectral_density`.

    Notes
    -----
    Cost per round of the choice of ``k``: one eigsh (warm-started from the previous ``U``),
    ``k`` products for the Rayleigh–Ritz step and 8 for the share; then
    ``num_probes * num_steps`` products for the SLQ of the remainder, once.

    Examples
    --------
    >>> lam = torch.cat([torch.tensor([1.0]), torch.full((399,), 1e-4)]).double()
    >>> r = deflated_slq(torch.diag(lam), num_probes=8, num_steps=20)
    >>> from lanczos_ntk import effective_rank
    >>> round(effective_rank(r).value, 2)  # (tr A)² / tr A² = 1.0399² / 1.0000040 = 1.0814
    1.08
    """
    for name, v in (("num_probes", num_probes), ("num_steps", num_steps), ("k_max", k_max)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"expected a positive integer {name}, got {v!r}")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"expected k None or a positive integer, got {k!r}")
    A = as_operator(op, side)
    gen, seed = _seed_of(generator)
    dev = _work_device(A)
    work = linalg._common.as_work(A.matmul, A.dtype, dev)
    n = A.n
    adaptive = k is None
    given = None
    if eigenpairs is not None:
        given = eigenpairs.eigenvectors
        if given is None or given.ndim != 2 or given.shape[0] != n:
            raise ValueError(
                f"expected eigenpairs with eigenvectors of shape [{n}, k] (the "
                f"{A.side} side; eigsh(..., return_eigenvectors=True) on the same "
                f"operator), got {None if given is None else tuple(given.shape)}"
            )
    start = given.shape[1] if given is not None else 4
    kk = min(k if k is not None else start, max(n - 1, 1))
    k_max = min(max(k_max, kk), max(n - 1, 1))
    matvecs = 0
    history: list[tuple[int, float]] = []
    U = None
    status = Status.CONVERGED
    while True:
        if given is not None and given.shape[1] >= kk:
            assert eigenpairs is not None  # given comes from it
            found = dataclasses.replace(eigenpairs, eigenvectors=given[:, :kk])
            given = None
        else:
            found = eigsh(A, kk, "LA", tol, return_eigenvectors=True, generator=gen, v0=U, verify=False)
            matvecs += found.num_matvecs
        if found.status not in (Status.CONVERGED, Status.ACCURACY_LIMITED):
            status = found.status
        assert found.eigenvectors is not None  # asked for
        U, AU, top = _rayleigh_ritz(work, found.eigenvectors.to(torch.float64))
        matvecs += U.shape[1]
        PAU = AU - U @ (U.T @ AU)
        cross = 2.0 * float((PAU * PAU).sum())
        top_res = torch.linalg.vector_norm(AU - U * top, dim=0)

        def remainder(X: torch.Tensor, U: torch.Tensor = U) -> torch.Tensor:
            X = X - U @ (U.T @ X)
            W = work(X)
            return W - U @ (U.T @ W)

        # the remainder's share of tr A², from a few Hutchinson probes: E ||R g||² = tr R²
        G = linalg._common.random_block(n, _SHARE_PROBES, gen, dev, probe)
        RG = remainder(G)
        matvecs += _SHARE_PROBES
        t2 = float((RG * RG).sum(dim=0).mean())
        total = float((top**2).sum()) + cross + t2
        share = t2 / total if total > 0 else 0.0
        stalled = len(history) > 0 and share > 0.7 * history[-1][1]  # a flat spectrum
        history.append((kk, share))
        if not adaptive or share <= share_tol or kk >= k_max or stalled:
            break
        kk = min(2 * kk, k_max)
    G = linalg._common.random_block(n, num_probes, gen, dev, probe)
    G = G - U @ (U.T @ G)
    q = linalg.lanczos_quadrature(
        remainder,
        n,
        num_probes,
        num_steps,
        generator=gen,
        device=dev,
        probes=G,
        reorthogonalize=8 * n * num_steps * num_probes <= 2**30,
    )
    matvecs += q.num_matvecs
    rem = SLQResult.from_quadrature(
        q,
        dimension=n,
        primal_dimension=n,
        side=A.side,
        num_probes=num_probes,
        probe=probe,
        reorthogonalize=True,
        dtype=A.dtype,
        device=A.device,
        seed=seed,
    )
    return DeflatedSLQ(
        top=top,
        top_residuals=top_res,
        cross=cross,
        remainder=rem,
        k=kk,
        remainder_share=share,
        history=tuple(history),
        status=status,
        num_matvecs=matvecs,
        dimension=n,
        primal_dimension=A.primal_dimension,
        side=A.side,
        seed=seed,
    )
