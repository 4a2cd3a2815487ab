"""Dense float64 references for checking operators, on small problems only.

These functions form ``J`` (``M × P``), ``K = J Jᵀ`` and ``G = Jᵀ J`` explicitly with
``torch.func.jacrev``; they exist so that users can verify the matrix-free operators on their
own models (``assert_operator_close``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .operators import resolve_params

__all__ = [
    "assert_operator_close",
    "dense_gram",
    "dense_jacobian",
    "dense_ntk",
    "dense_operator",
    "matrix_with_spectrum",
]


class _Reference(nn.Module):
    """The model's outputs as one module, so that ``functional_call`` substitutes every
    parameter, the readout's included. Written apart from the operators' own functional form
    (:class:`~lanczos_ntk.operators.ModelFunction`), which this reference checks.
    """

    def __init__(self, model: nn.Module, outputs: str | Callable):
        super().__init__()
        self.m: Any = model  # read / readout are the user's attributes
        self.outputs: Any = outputs

    def forward(self, u: torch.Tensor, h0) -> torch.Tensor:
        states = self.m(u) if h0 is None else self.m(u, h0)
        if isinstance(states, tuple):  # torch's RNN/GRU/LSTM: (per-step states, final state)
            states = states[0]
        if self.outputs == "states":
            return states
        if self.outputs == "readout":
            read = getattr(self.m, "read", None)
            return read(states) if callable(read) else self.m.readout(states)
        return self.outputs(states)


def dense_jacobian(
    model: nn.Module,
    inputs: torch.Tensor,
    *,
    h0=None,
    outputs: str | Callable = "states",
    params: Sequence[str] | None = None,
) -> torch.Tensor:
    """``J = ∂ vec(outputs) / ∂θ`` as a dense ``[M, P]`` tensor (float64), by ``jacrev``.

    Rows are ordered ``(trial, time, unit)``; columns follow ``model.named_parameters()``
    when ``params`` is None, else the order of ``params`` (as :attr:`StateNTK.param_names`).
    """
    if any(t.dtype != torch.float64 for t in model.parameters()):
        raise TypeError("dense references are float64: convert the model with .double() first")
    names = list(resolve_params(model, params))
    ref = _Reference(model, outputs)
    u = inputs.to(torch.float64)
    if h0 is not None:
        h0 = tuple(t.to(torch.float64) for t in h0) if isinstance(h0, tuple) else h0.to(torch.float64)
    theta = {"m." + n: t.detach() for n, t in model.named_parameters() if n in names}

    def f(q):
        return torch.func.functional_call(ref, q, (u, h0)).reshape(-1)

    jac = torch.func.jacrev(f)(theta)
    M = jac["m." + names[0]].shape[0]
    return torch.cat([jac["m." + n].reshape(M, -1) for n in names], dim=1).detach()


def dense_ntk(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    """Dense ``K = J Jᵀ`` ``[M, M]`` (float64); same keyword arguments as :func:`dense_jacobian`."""
    J = dense_jacobian(model, inputs, **kwargs)
    return J @ J.T


def dense_gram(model: nn.Module, inputs: torch.Tensor, **kwargs) -> torch.Tensor:
    """Dense ``G = Jᵀ J`` ``[P, P]`` (float64)."""
    J = dense_jacobian(model, inputs, **kwargs)
    return J.T @ J


def dense_operator(op, block: int = 64) -> torch.Tensor:
    """Materialise any square operator with ``.shape`` and ``.matmul`` by applying it to ``I``."""
    n = op.shape[-1]
    cols = []
    for s in range(0, n, block):
        eye = torch.zeros(n, min(block, n - s), dtype=torch.float64)
        eye[s : s + eye.shape[1]].copy_(torch.eye(eye.shape[1], dtype=torch.float64))
        cols.append(op.matmul(eye.to(op.dtype)).to(torch.float64))
    return torch.cat(cols, dim=1)


def assert_operator_close(op, dense: torch.Tensor, *, rtol: float = 1e-10, block: int = 64) -> float:
    """Check ``op`` against a dense reference in relative Frobenius error; return the error.

    Raises ``AssertionError`` with the measured error when it exceeds ``rtol``.
    """
    got = dense_operator(op, block=block)
    if got.shape != dense.shape:
        raise AssertionError(f"shape mismatch: operator {tuple(got.shape)}, reference {tuple(dense.shape)}")
    scale = dense.norm().clamp_min(torch.finfo(torch.float64).tiny)
    err = float(((got - dense.to(torch.float64)).norm() / scale).detach())
    if not err <= rtol:
        raise AssertionError(
            f"operator differs from the dense reference: relative error {err:.3e} > {rtol:.1e}"
        )
    return err


def matrix_with_spectrum(eigenvalues, generator: torch.Generator | None = None) -> torch.Tensor:
    """Symmetric ``Q diag(λ) Qᵀ`` (float64) with a random orthogonal ``Q`` from ``generator``:
    a test matrix whose spectrum is known exactly, for checking eigensolvers and estimators.
    """
    lam = torch.as_tensor(eigenvalues, dtype=torch.float64)
    n = lam.numel()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))
    A = Q @ torch.diag(lam) @ Q.T
    return 0.5 * (A + A.T)
