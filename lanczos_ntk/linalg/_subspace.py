"""One step of subspace iteration with Rayleigh–Ritz: tracking a dominant subspace that moves
a little between calls (an operator along a training run), at the cost of one block product.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._common import Matmul

__all__ = ["SubspaceStep", "subspace_step"]


class SubspaceStep(NamedTuple):
    """``eigenvalues`` (descending) and ``eigenvectors`` (Ritz pairs from the basis ``V``),
    their true ``residuals`` ``‖A x − θ x‖``, and ``basis``: the orthonormal basis for the next
    step, ``orth(A V S)`` (one step of subspace iteration).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    basis: torch.Tensor


def subspace_step(matmul: Matmul, V: torch.Tensor) -> SubspaceStep:
    """Rayleigh–Ritz of the symmetric ``A`` (``matmul``) on the orthonormal basis ``V [n, m]``.

    One block product ``Y = A V``; ``H = Vᵀ Y = S Θ Sᵀ``; Ritz pairs ``(θ_i, V s_i)``, ordered
    by decreasing ``θ``, with residuals ``‖Y s_i − θ_i V s_i‖`` (exact: no extra product); the
    next basis ``orth(Y S)`` advances the subspace iteration by one step, so repeated calls on
    a fixed operator converge to its dominant eigenvectors.
    """
    if V.dim() != 2 or V.shape[1] < 1:
        raise ValueError(f"expected a basis [n, m] with m >= 1, got {tuple(V.shape)}")
    Y = matmul(V)
    H = V.T @ Y
    theta, S = torch.linalg.eigh(0.5 * (H + H.T))
    theta, S = theta.flip(0), S.flip(1)
    X, YS = V @ S, Y @ S
    residuals = torch.linalg.vector_norm(YS - X * theta, dim=0)
    return SubspaceStep(theta, X, residuals, torch.linalg.qr(YS).Q)
