"""Trace estimates from products alone (Hutchinson, Hutch++)."""

from __future__ import annotations

from typing import Any

import torch

from .. import linalg
from ._coerce import _seed_of, _work_device, as_operator
from ._results import TraceResult


# ------------------------------------------------------------------------------------------
# Trace
# ------------------------------------------------------------------------------------------
def trace(
    op: Any,
    method: str = "hutch++",
    num_matvecs: int = 60,
    *,
    probe: str = "rademacher",
    generator: torch.Generator | None = None,
    side: str = "auto",
) -> TraceResult:
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
    kw: dict[str, Any] = dict(side=A.side, dimension=A.n, primal_dimension=A.primal_dimension)
    if method == "exact":
        if A.dense is not None:
            return TraceResult(float(torch.diagonal(A.dense).sum()), 0.0, "exact", 0, seed=None, **kw)
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
