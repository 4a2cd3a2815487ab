"""Spectral quantities of symmetric (PSD) operators: the public front door.

Every function accepts the operator in any of these forms (see :func:`as_operator`):

* a dense symmetric ``torch.Tensor`` ``[n, n]`` (or a numpy array);
* a ``linear_operator.LinearOperator`` or any object with ``.shape`` and ``.matmul``
  (e.g. :class:`lanczos_ntk.StateNTK`);
* a ``scipy.sparse.linalg.LinearOperator`` or a ``scipy.sparse`` matrix / array;
* a tuple ``(matvec, n)``: ``matvec`` maps float64 CPU tensors ``[n, k] -> [n, k]`` (a function
  that only takes vectors ``[n]`` is detected on the first call and applied column by column).

Every routine here assumes a symmetric operator: dense and sparse matrices are checked entry by
entry, callables and scipy operators by a randomized probe (two products), and a clearly
non-symmetric operator is refused with a ``ValueError``.

An operator with a ``.dual()`` method (the sNTK ``K = J Jᵀ``, ``M × M``, whose dual is the
parameter-space Gram ``G = Jᵀ J``, ``P × P``, with the same nonzero eigenvalues) is worked on
from whichever side is smaller (``side="auto"``); results record the side and account for the
``|M - P|`` extra zeros, so they always describe the operator that was passed.

The expensive part (Lanczos runs) is separated from the cheap part: :func:`slq` returns the
quadrature nodes and weights once, and :func:`spectral_density`, :func:`tr_f`,
:func:`effective_rank` and :func:`trace_from_slq` reuse them without new products.
"""

from ..linalg import NumericalWarning
from ._coerce import as_operator
from ._deflated import DeflatedSLQ, deflated_slq
from ._eigen import condition_number, eigsh
from ._quadrature import effective_rank, slq, spectral_density, tr_f, trace_from_slq
from ._results import (
    ConditionNumber,
    EffectiveRank,
    EigshResult,
    NoConvergence,
    SLQResult,
    SpectralDensity,
    TraceResult,
)
from ._trace import trace

__all__ = [
    "ConditionNumber",
    "DeflatedSLQ",
    "EffectiveRank",
    "EigshResult",
    "NoConvergence",
    "NumericalWarning",
    "SLQResult",
    "SpectralDensity",
    "TraceResult",
    "as_operator",
    "condition_number",
    "deflated_slq",
    "effective_rank",
    "eigsh",
    "slq",
    "spectral_density",
    "tr_f",
    "trace",
    "trace_from_slq",
]

_DEFAULT_SEED = 0

# results are saved under their public path (lanczos_ntk.spectral:EigshResult), whatever file
# defines them: saved results do not name a private module, and moving code keeps them loadable
for _cls in (
    ConditionNumber,
    DeflatedSLQ,
    EffectiveRank,
    EigshResult,
    SLQResult,
    SpectralDensity,
    TraceResult,
    NoConvergence,
):
    _cls.__module__ = __name__
del _cls
