"""Operators: the sNTK ``K = J Jᵀ`` and its dual ``G = Jᵀ J`` as matrix-free linear operators.

The data flow inside this package, bottom to top:

* :mod:`._functional` — a model as a pure function ``f(θ, u)`` (:class:`ModelFunction`) and the
  differentiated parameters (:class:`ParamSpec`, :func:`resolve_params`);
* :mod:`._budget` — the memory budget and the plan it gives (:class:`ProductPlan`);
* product paths — :mod:`._closed_form` (CTRNN / DiscreteRNN / ``nn.RNN``), :mod:`._cells`,
  :mod:`._loop_cell`, :mod:`._cell_path` and :mod:`._traced_step` (any model with a one-step
  cell, named or read off its forward), :mod:`._rnn_path` (``nn.GRU`` / ``nn.LSTM`` gates),
  :mod:`._dual_graph` (other modules: cached autodiff);
* :mod:`._engine` — :class:`JacobianEngine`, which picks a path per chunk and holds the cached
  linearisations;
* :mod:`._operator` — the ``linear_operator`` classes over the engine (:class:`StateNTK`,
  :class:`DualNTK`, :class:`NTKPlusNoise`, and :class:`JacobianProductOperator`, the base class
  of every operator of the form ``J_a X J_bᵀ`` that other packages extend);
* :mod:`._partial_trace` — traces of ``K`` restricted to time steps or units.

Model-specific Jacobian code lives here, not in the model classes: models describe dynamics.
"""

from ._budget import ProductPlan
from ._engine import JacobianEngine
from ._functional import ModelFunction, ParamSpec, resolve_params
from ._operator import DualNTK, JacobianProductOperator, NTKPlusNoise, StateNTK
from ._partial_trace import PartialTrace, partial_trace

__all__ = [
    "DualNTK",
    "JacobianEngine",
    "JacobianProductOperator",
    "ModelFunction",
    "NTKPlusNoise",
    "ParamSpec",
    "PartialTrace",
    "ProductPlan",
    "StateNTK",
    "partial_trace",
    "resolve_params",
]
