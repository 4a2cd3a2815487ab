"""Diagonal linear state-space layer (complex-diagonal recurrence in real arithmetic)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import StateSpaceModel
from ._rnn import _generator

__all__ = ["DiagonalSSM"]


class DiagonalSSM(StateSpaceModel):
    r"""Linear recurrent unit with a complex-diagonal transition, LRU / S4D style.

    The complex state ``z ∈ C^m`` evolves as ``z_{t+1} = λ ⊙ z_t + (B_re + i B_im) u_t`` with
    ``λ = exp(-exp(ν) + i exp(φ))`` (stable by construction). The real state is
    ``h = [Re z, Im z]`` (``n = 2m``). Eigenvalue moduli are initialised uniformly in
    ``[r_min, r_max]`` and phases in ``[0, max_phase]`` (Orvieto et al. 2023).
    """

    kind = "map"

    def __init__(
        self,
        modes: int,
        input_size: int,
        *,
        r_min: float = 0.5,
        r_max: float = 0.95,
        max_phase: float = math.pi,
        readout_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        if not 0.0 < r_min <= r_max < 1.0:
            raise ValueError(f"expected 0 < r_min <= r_max < 1, got {r_min}, {r_max}")
        g = _generator(seed, generator)
        super().__init__(2 * int(modes), input_size)
        m, d = int(modes), self.input_size
        self.modes = m
        radius = r_min + (r_max - r_min) * torch.rand(m, generator=g, dtype=torch.float64)
        phase = max_phase * torch.rand(m, generator=g, dtype=torch.float64).clamp_min(1e-3)
        self.nu_log = nn.Parameter(torch.log(-torch.log(radius)).to(dtype))
        self.phase_log = nn.Parameter(torch.log(phase).to(dtype))
        scale = 1.0 / math.sqrt(2 * max(d, 1))
        self.B_re = nn.Parameter((scale * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype))
        self.B_im = nn.Parameter((scale * torch.randn(m, d, generator=g, dtype=torch.float64)).to(dtype))
        self._make_readout(readout_size, g, dtype)

    def eigenvalues(self) -> torch.Tensor:
        """The diagonal transition ``λ`` (complex, shape ``[m]``)."""
        return torch.exp(torch.complex(-torch.exp(self.nu_log), torch.exp(self.phase_log)))

    def rhs(self, h, u):
        m = self.modes
        mod = torch.exp(-torch.exp(self.nu_log))
        ang = torch.exp(self.phase_log)
        c, s = mod * torch.cos(ang), mod * torch.sin(ang)
        re, im = h[..., :m], h[..., m:]
        new_re = c * re - s * im + u @ self.B_re.T
        new_im = s * re + c * im + u @ self.B_im.T
        return torch.cat([new_re, new_im], dim=-1)
