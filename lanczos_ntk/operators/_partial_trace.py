r"""Partial traces of the state-space NTK over units or over time, matrix-free.

``K`` is indexed by (trial ``b``, time ``t``, unit ``i``). Tracing out one axis keeps the kernel's
structure along the others:

- ``keep="time"``: ``K_time[(b,t),(b',t')] = Σ_i K[(b,t,i),(b',t',i)]``, ``BT × BT``. Its
  effective rank counts the temporal patterns of the states' response to a parameter step (a
  kernel collapsed onto one slow mode has one);
- ``keep="units"``: ``K_units[(b,i),(b',i')] = Σ_t K[(b,t,i),(b',t,i')]``, ``Bn × Bn``: the
  spatial patterns (one for a channel ``v ⊗ c_t``, two for a rotating pair).

Both are positive semi-definite (each is a sum of principal blocks ``E_jᵀ K E_j`` of ``K``) and
have the trace of ``K``. One product costs one block product of ``K`` with ``n`` (``keep="time"``)
or ``T`` (``keep="units"``) columns per vector: ``K_time x = Σ_i E_iᵀ K E_i x`` with ``E_i x``
the vector ``x`` placed on unit ``i``.
"""

from __future__ import annotations

import torch

from ._operator import StateNTK

__all__ = ["PartialTrace", "partial_trace"]

_KEEP = ("time", "units")


class PartialTrace:
    """``K`` with units (``keep="time"``) or time steps (``keep="units"``) traced out.

    A symmetric positive semi-definite operator of size ``B·T`` or ``B·n`` (``shape``,
    ``dtype``, ``device``, ``matmul``) for :func:`lanczos_ntk.eigsh`,
    :func:`lanczos_ntk.effective_rank` and the other estimators. Built with
    :func:`partial_trace`. ``group`` bounds how many traced-out indices share one product of
    ``K`` (memory ``M · group`` per vector).
    """

    def __init__(self, K, keep: str, group: int = 64):
        engine = K.engine
        self.K, self.keep = K, keep
        self.trials, self.steps, self.width = engine.batch, engine.steps, engine.width
        kept = self.steps if keep == "time" else self.width
        self.n = self.trials * kept
        self.shape = torch.Size([self.n, self.n])
        self.dtype, self.device = engine.dtype, engine.device
        self.group = max(1, int(group))

    def __repr__(self) -> str:
        return (
            f"PartialTrace(keep={self.keep!r}, shape={tuple(self.shape)}, trials="
            f"{self.trials}, steps={self.steps}, units={self.width})"
        )

    def matmul(self, X: torch.Tensor) -> torch.Tensor:
        vec = X.dim() == 1
        X = X[:, None] if vec else X
        if X.shape[0] != self.n:
            raise ValueError(f"expected a right-hand side with {self.n} rows, got {tuple(X.shape)}")
        X = X.to(dtype=self.dtype, device=self.device)
        B, T, n, k = self.trials, self.steps, self.width, X.shape[1]
        traced = n if self.keep == "time" else T
        out = torch.zeros(self.n, k, dtype=self.dtype, device=self.device)
        for s in range(0, traced, self.group):
            idx = torch.arange(s, min(s + self.group, traced), device=self.device)
            g = idx.numel()
            # V[b, t, i, c, j]: column (c, j) holds x_c placed on traced index idx[j]
            V = torch.zeros(B, T, n, k, g, dtype=self.dtype, device=self.device)
            if self.keep == "time":
                V[:, :, idx, :, torch.arange(g)] = (
                    X.reshape(B, T, k)[:, :, None, :].expand(B, T, g, k).permute(2, 0, 1, 3)
                )
            else:
                V[:, idx, :, :, torch.arange(g)] = (
                    X.reshape(B, n, k)[:, None, :, :].expand(B, g, n, k).permute(1, 0, 2, 3)
                )
            Y = self.K.matmul(V.reshape(B * T * n, k * g)).reshape(B, T, n, k, g)
            if self.keep == "time":
                out += Y[:, :, idx, :, torch.arange(g)].sum(dim=0).reshape(B * T, k)
            else:
                out += Y[:, idx, :, :, torch.arange(g)].sum(dim=0).reshape(B * n, k)
        return out[:, 0] if vec else out

    def __matmul__(self, X: torch.Tensor) -> torch.Tensor:
        return self.matmul(X)


def partial_trace(K, keep: str = "time", *, group: int = 64) -> PartialTrace:
    r"""The sNTK with one axis traced out: ``keep="time"`` sums over units, ``"units"`` over time.

    Parameters
    ----------
    K : StateNTK
        The kernel (its engine knows the trials × time × units layout).
    keep : {"time", "units"}
        Which axis the result keeps (trials are always kept).
    group : int
        Traced-out indices per product of ``K`` (memory per vector: ``M · group`` numbers).

    Returns
    -------
    PartialTrace
        ``effective_rank(partial_trace(K, "time"))`` is the temporal effective rank,
        ``"units"`` the spatial one.

    Examples
    --------
    >>> import torch, lanczos_ntk as lnk
    >>> K = lnk.StateNTK(lnk.models.CTRNN(4, 1, seed=0),
    ...                  torch.randn(2, 6, 1, dtype=torch.float64,
    ...                              generator=torch.Generator().manual_seed(0)))
    >>> Kt = lnk.partial_trace(K, "time")
    >>> Kt.shape, lnk.partial_trace(K, "units").shape
    (torch.Size([12, 12]), torch.Size([8, 8]))
    """
    if not isinstance(K, StateNTK):
        raise TypeError(f"expected a lanczos_ntk.StateNTK, got {type(K).__name__}")
    if keep not in _KEEP:
        raise ValueError(f"expected keep in {_KEEP} (the axis the result keeps), got {keep!r}")
    return PartialTrace(K, keep, group)
