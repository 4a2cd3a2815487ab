"""Recurrent networks: continuous-time RNN, discrete RNN and an explicit GRU."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import StateSpaceModel

__all__ = ["CTRNN", "DiscreteRNN", "GRU"]


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(0 if seed is None else int(seed))
    return g


def _gaussian(shape, scale, g, dtype) -> nn.Parameter:
    return nn.Parameter(scale * torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype))


class CTRNN(StateSpaceModel):
    r"""Continuous-time RNN ``dh/dt = -h + W tanh(h) + U u + b``, explicit Euler with ``dt``.

    Parameters
    ----------
    state_size, input_size : int
    gain : float
        Recurrent gain ``g``: ``W = g / sqrt(n) * N(0, 1)`` entries. The trivial fixed point of
        the autonomous network loses stability when ``g · max Re eig(W₀) = 1``.
    dt : float
        Euler step.
    readout_size : int, optional
        Adds a linear readout ``y = C h + c``.
    seed, generator : initialisation randomness (the global RNG is never used).
    input_scale : float
        Scale of the input weights ``U`` (``input_scale / sqrt(d_in) * N(0,1)``; called ``B``
        before 0.2, and state dicts naming ``B`` still load).
    dtype : parameter dtype (float64 by default, the library's reference precision).

    Examples
    --------
    >>> import torch, lanczos_ntk as lnk
    >>> m = lnk.models.CTRNN(8, 2, gain=1.5, seed=1)
    >>> m(torch.zeros(3, 5, 2, dtype=torch.float64)).shape
    torch.Size([3, 5, 8])
    """

    kind = "flow"
    RENAMED = {"B": "U"}

    def __init__(
        self,
        state_size: int,
        input_size: int,
        *,
        gain: float = 1.0,
        dt: float = 0.1,
        readout_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        input_scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ):
        g = _generator(seed, generator)
        super().__init__(state_size, input_size)
        n, d = self.state_size, self.input_size
        self.dt = float(dt)
        self.gain = float(gain)
        self.W = _gaussian((n, n), gain / math.sqrt(n), g, dtype)
        self.U = _gaussian((n, d), input_scale / math.sqrt(max(d, 1)), g, dtype)
        self.b = nn.Parameter(torch.zeros(n, dtype=dtype))
        self._make_readout(readout_size, g, dtype)

    def rhs(self, h, u):
        return -h + torch.tanh(h) @ self.W.T + u @ self.U.T + self.b


class DiscreteRNN(StateSpaceModel):
    r"""Discrete-time RNN ``h_{t+1} = tanh(W h_t + U u_t + b)``.

    ``W = gain / sqrt(n) · N(0, 1)``; ``U = input_scale / sqrt(d_in) · N(0, 1)``; ``b = 0``.
    """

    kind = "map"

    def __init__(
        self,
        state_size: int,
        input_size: int,
        *,
        gain: float = 1.0,
        readout_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        input_scale: float = 1.0,
        dtype: torch.dtype = torch.float64,
    ):
        g = _generator(seed, generator)
        super().__init__(state_size, input_size)
        n, d = self.state_size, self.input_size
        self.gain = float(gain)
        self.W = _gaussian((n, n), gain / math.sqrt(n), g, dtype)
        self.U = _gaussian((n, d), input_scale / math.sqrt(max(d, 1)), g, dtype)
        self.b = nn.Parameter(torch.zeros(n, dtype=dtype))
        self._make_readout(readout_size, g, dtype)

    def rhs(self, h, u):
        return torch.tanh(h @ self.W.T + u @ self.U.T + self.b)


class GRU(StateSpaceModel):
    r"""Gated recurrent unit written out explicitly (forward-mode AD safe, no fused kernel).

    .. math::
        z = σ(W_z h + U_z u + b_z),\quad r = σ(W_r h + U_r u + b_r),\\
        \tilde h = \tanh(W_h (r ⊙ h) + U_h u + b_h),\quad h' = (1 - z) ⊙ h + z ⊙ \tilde h.

    Weights are ``N(0, 1/n)`` (recurrent, times ``gain``) and ``N(0, 1/d_in)`` (input).
    """

    kind = "map"

    def __init__(
        self,
        state_size: int,
        input_size: int,
        *,
        gain: float = 1.0,
        readout_size: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ):
        g = _generator(seed, generator)
        super().__init__(state_size, input_size)
        n, d = self.state_size, self.input_size
        self.gain = float(gain)
        self.W = _gaussian((3 * n, n), gain / math.sqrt(n), g, dtype)
        self.U = _gaussian((3 * n, d), 1.0 / math.sqrt(max(d, 1)), g, dtype)
        self.b = nn.Parameter(torch.zeros(3 * n, dtype=dtype))
        self._make_readout(readout_size, g, dtype)

    def rhs(self, h, u):
        n = self.state_size
        Wz, Wr, Wh = self.W[:n], self.W[n : 2 * n], self.W[2 * n :]
        xu = u @ self.U.T + self.b
        z = torch.sigmoid(h @ Wz.T + xu[..., :n])
        r = torch.sigmoid(h @ Wr.T + xu[..., n : 2 * n])
        cand = torch.tanh((r * h) @ Wh.T + xu[..., 2 * n :])
        return (1 - z) * h + z * cand
