"""Extreme eigenpairs (thick-restart Lanczos) and condition numbers."""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import numpy as np
import torch

from .. import linalg
from .._results import Status
from ._coerce import _seed_of, _work_device, as_operator
from ._results import ConditionNumber, EigshResult, NoConvergence


# ------------------------------------------------------------------------------------------
# Extreme eigenpairs
# ------------------------------------------------------------------------------------------
def eigsh(
    op: Any,
    k: int = 10,
    which: str = "LA",
    tol: float = 1e-6,
    *,
    ncv: int | None = None,
    max_restarts: int = 200,
    block_size: int | None = None,
    return_eigenvectors: bool = False,
    generator: torch.Generator | None = None,
    v0: torch.Tensor | None = None,
    side: str = "auto",
    null_rtol: float | None = None,
    dense_max: int | None = None,
    raise_on_failure: bool = False,
    verify: bool = True,
) -> EigshResult:
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
    if (
        return_eigenvectors
        and v0 is None
        and side == "primal"
        and getattr(op, "distributed", False)
        and getattr(op, "_side", "") == "primal"
    ):
        return _split_primal_eigenvectors(
            op,
            eigsh(
                op.dual(),
                k,
                which,
                tol,
                ncv=ncv,
                max_restarts=max_restarts,
                block_size=block_size,
                return_eigenvectors=True,
                generator=generator,
                side="primal",
                null_rtol=null_rtol,
                dense_max=dense_max,
                raise_on_failure=raise_on_failure,
                verify=verify,
            ),
        )
    A = as_operator(op, side)
    if k > A.n:
        warnings.warn(
            f"eigsh: k={k} exceeds the dimension n={A.n} of the {A.side} side; "
            f"returning all its eigenvalues from a dense solve ({A.n} products)",
            UserWarning,
            stacklevel=2,
        )
        k, dense_max = A.n, A.n
    b = 1 if block_size is None else int(block_size)
    if b < 1 or b > A.n:
        raise ValueError(f"expected 1 <= block_size <= {A.n}, got {block_size!r}")
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.ndim not in (1, 2) or v0.shape[0] != A.n:
            got = tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__
            raise ValueError(f"expected v0 of shape [{A.n}] or [{A.n}, p] (the {A.side} side), got {got}")
    gen, seed = _seed_of(generator)
    dev = _work_device(A)
    out = linalg.thick_restart_lanczos(
        A.matmul,
        A.n,
        int(k),
        which=which,
        tol=float(tol),
        ncv=ncv,
        max_restarts=max_restarts,
        block_size=b,
        v0=v0,
        generator=gen,
        dtype=A.dtype,
        device=dev,
        null_rtol=null_rtol,
        return_eigenvectors=return_eigenvectors or verify,
        dense_max=dense_max,
    )
    values, vectors, residuals, converged = out.eigenvalues, out.eigenvectors, out.residuals, out.converged
    status = Status(out.status)
    matvecs, matmuls, missed = out.num_matvecs, out.num_matmuls, 0
    iterative = out.ncv < A.n  # the dense solve finds every copy
    if (
        verify
        and iterative
        and which != "SA"
        and len(values)
        and status in (Status.CONVERGED, Status.ACCURACY_LIMITED)
    ):
        assert vectors is not None  # computed whenever verify is on
        done = linalg.complete_multiplicities(
            A.matmul,
            A.n,
            values,
            vectors,
            residuals,
            which=which,
            tol=float(tol),
            anorm=out.lambda_max,
            generator=gen,
            dtype=A.dtype,
            device=dev,
        )
        values, vectors, residuals, converged = (
            done.eigenvalues,
            done.eigenvectors,
            done.residuals,
            done.converged,
        )
        matvecs, matmuls, missed = matvecs + done.num_matvecs, matmuls + done.num_matmuls, done.missed
        if missed:
            status = Status(done.status)
    null_dim = None
    if out.null_dim is not None:
        null_dim = max(0, out.null_dim + A.extra_zeros)
    result = EigshResult(
        eigenvalues=values,
        eigenvectors=vectors if return_eigenvectors else None,
        residuals=residuals,
        converged=converged,
        status=status,
        k=int(k),
        which=which,
        tol=float(tol),
        null_dim=null_dim,
        lambda_max=out.lambda_max,
        num_matvecs=matvecs,
        num_matmuls=matmuls,
        num_restarts=out.num_restarts,
        block_size=b,
        ncv=out.ncv,
        side=A.side,
        dimension=A.n,
        primal_dimension=A.primal_dimension,
        dtype=str(A.dtype).removeprefix("torch."),
        device=str(A.device),
        seed=seed,
        missed_copies=missed,
    )
    if raise_on_failure and result.status != Status.CONVERGED:
        raise NoConvergence(
            f"eigsh: {int(result.converged.sum())} of {k} eigenpairs converged to tol={tol:g} "
            f"after {result.num_restarts} restarts ({result.status.value}); raise max_restarts "
            f"or ncv, or loosen tol",
            result,
        )
    return result


def _split_primal_eigenvectors(K: Any, dual: EigshResult) -> EigshResult:
    """Eigenpairs of a ``K`` split over a process group, from those of ``G = K.dual()``:
    ``y = J x / sqrt(λ)`` on this rank's rows, with the true residuals ``‖K y − λ y‖`` over all
    ranks (``K y − λ y = J (G x − λ x) / sqrt(λ)``: one block product on each side).
    """
    lam, X = dual.eigenvalues, dual.eigenvectors
    assert X is not None  # asked for
    scale = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()
    Y = K.jvp(X) / scale
    R = K.jvp(K.dual().matmul(X) - X * lam) / scale
    sq = (R * R).sum(dim=0)
    torch.distributed.all_reduce(sq, group=K.engine.group)
    residuals = sq.sqrt().to(dual.residuals.dtype)
    return dataclasses.replace(
        dual,
        eigenvectors=Y,
        residuals=residuals,
        side="primal",
        dimension=int(K.total_states),
        num_matvecs=dual.num_matvecs + len(lam),
    )


def condition_number(
    op: Any,
    *,
    tol: float = 1e-6,
    side: str = "auto",
    generator: torch.Generator | None = None,
    null_rtol: float | None = None,
    ncv: int | None = None,
    max_restarts: int = 200,
    dense_max: int | None = None,
) -> ConditionNumber:
    """Condition number ``λ_max / λ_min`` of the nonzero part of a PSD operator.

    Two :func:`eigsh` runs (``which="LA"`` and ``which="SA"``, ``k=1``); eigenvalues below
    ``null_rtol * λ_max`` are the null space and excluded. ``value`` is ``inf`` when no nonzero
    eigenvalue was found. Cost: two eigsh runs (the SA one dominates for large ``κ``, roughly
    ``sqrt(κ)`` products per digit; below ``dense_max`` it is a dense ``eigh``).
    """
    A = as_operator(op, side)
    gen, _ = _seed_of(generator)
    hi = eigsh(A, 1, "LA", tol, generator=gen, ncv=ncv, max_restarts=max_restarts)
    lo = eigsh(
        A,
        1,
        "SA",
        tol,
        generator=gen,
        ncv=ncv,
        max_restarts=max_restarts,
        null_rtol=null_rtol,
        dense_max=dense_max,
    )
    lmax = float(hi.eigenvalues[0])
    lmin = float(lo.eigenvalues[0]) if len(lo.eigenvalues) else 0.0
    value = lmax / lmin if lmin > 0 else math.inf
    ok = hi.status == Status.CONVERGED and lo.status == Status.CONVERGED
    return ConditionNumber(
        value=value,
        lambda_max=lmax,
        lambda_min=lmin,
        null_dim=lo.null_dim,
        status=Status.CONVERGED if ok else Status.MAX_ITERATIONS,
        num_matvecs=hi.num_matvecs + lo.num_matvecs,
        side=A.side,
        primal_dimension=A.primal_dimension,
    )
