"""Built-in state-space models.

Every model is a ``torch.nn.Module`` whose ``forward(u, h0=None)`` maps inputs ``[B, T, d_in]``
to hidden states ``[B, T, n]``, with ``kind`` (``"flow"`` or ``"map"``), the one-step
``rhs(h, u)`` (vector field or map) used by :mod:`lanczos_ntk.dynamics`, ``step(h, u)`` and an
optional linear ``readout``.
"""

from ._base import StateSpaceModel, check_inputs
from ._normal_forms import (
    CONTINUOUS_FORMS,
    DISCRETE_FORMS,
    ContinuousNormalForm,
    DiscreteNormalForm,
)
from ._rnn import CTRNN, GRU, DiscreteRNN
from ._ssm import DiagonalSSM

__all__ = [
    "CONTINUOUS_FORMS",
    "CTRNN",
    "DISCRETE_FORMS",
    "GRU",
    "ContinuousNormalForm",
    "DiagonalSSM",
    "DiscreteNormalForm",
    "DiscreteRNN",
    "StateSpaceModel",
    "check_inputs",
]
