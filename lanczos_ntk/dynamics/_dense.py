"""Small dense linear algebra for the corrector and the spectra (internal).

Matrices here are ``n × n`` or ``(n+1) × (n+1)`` with ``n`` in the hundreds. On the CPU they go
to LAPACK through SciPy with the BLAS pool limited to one thread (when ``threadpoolctl`` is
available): for matrices this small a single thread is as fast, and it does not collapse when the
cores are shared (torch's multithreaded ``eigvals`` was measured 50× slower under load).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

try:  # optional: scipy/numpy work without it
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover
    ThreadpoolController = None

__all__ = ["eigvals", "slogdet", "solve", "svd"]

_TINY, _SMALL = 48, 600
_controller = None


def _limit(n: int):
    """One BLAS thread for ``_TINY <= n <= _SMALL`` (the library scan is done once)."""
    global _controller
    if ThreadpoolController is None or not _TINY <= n <= _SMALL:
        return contextlib.nullcontext()
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.limit(limits=1, user_api="blas")


def _np(A: torch.Tensor) -> np.ndarray:
    return A.detach().cpu().numpy()


def eigvals(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a square matrix, complex128."""
    if A.device.type != "cpu":
        return torch.linalg.eigvals(A).to(torch.complex128)
    import scipy.linalg  # deferred: importing SciPy's linalg costs ~0.3 s

    with _limit(A.shape[-1]):
        ev = scipy.linalg.eigvals(_np(A), check_finite=False)
    return torch.from_numpy(np.asarray(ev, dtype=np.complex128))


def solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A⁻¹ b``; raises ``RuntimeError`` (like torch) if ``A`` is exactly singular."""
    if A.device.type != "cpu":
        return torch.linalg.solve(A, b)
    with _limit(A.shape[-1]):
        try:
            x = np.linalg.solve(_np(A), _np(b))
        except (np.linalg.LinAlgError, ValueError) as exc:
            raise RuntimeError(f"singular matrix: {exc}") from exc
    return torch.from_numpy(np.asarray(x)).to(b.dtype if not np.iscomplexobj(x) else torch.complex128)


def slogdet(A: torch.Tensor) -> tuple[float, float]:
    """(sign, log|det|) of a real square matrix; sign 0 for an exactly singular one."""
    if A.device.type != "cpu":
        s, l = torch.linalg.slogdet(A)
        return float(s), float(l)
    with _limit(A.shape[-1]):
        s, l = np.linalg.slogdet(_np(A))
    return float(s), float(l)


def svd(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD ``A = U diag(s) Vh``."""
    if A.device.type != "cpu":
        return torch.linalg.svd(A)
    import scipy.linalg

    with _limit(max(A.shape[-2:])):
        U, s, Vh = scipy.linalg.svd(_np(A), check_finite=False)
    return torch.from_numpy(U), torch.from_numpy(s), torch.from_numpy(Vh)
