"""lanczos_ntk: matrix-free spectral estimation of the state-space neural tangent kernel."""

import warnings as _warnings

with _warnings.catch_warnings():
    # linear_operator decorates functions with torch.jit.script at import, which torch 2.x
    # deprecates; the warning is about linear_operator, not about the user's code
    _warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script` is deprecated", category=DeprecationWarning
    )
    import linear_operator as _linear_operator  # noqa: F401

from . import channels, dynamics, models, optim, plotting, testing, track  # plotting: matplotlib lazily
from ._results import Result, Status, load_result
from .operators import DualNTK, NTKPlusNoise, PartialTrace, ProductPlan, StateNTK, partial_trace
from .spectral import (
    ConditionNumber,
    DeflatedSLQ,
    EffectiveRank,
    EigshResult,
    NoConvergence,
    SLQResult,
    SpectralDensity,
    TraceResult,
    condition_number,
    deflated_slq,
    effective_rank,
    eigsh,
    slq,
    spectral_density,
    tr_f,
    trace,
    trace_from_slq,
)

__version__ = "0.1.0"

__all__ = [
    "DualNTK",
    "NTKPlusNoise",
    "ProductPlan",
    "Result",
    "StateNTK",
    "Status",
    "channels",
    "dynamics",
    "load_result",
    "models",
    "optim",
    "testing",
]
__all__ += ["DeflatedSLQ", "PartialTrace", "deflated_slq", "partial_trace"]
__all__ += [
    "ConditionNumber",
    "EffectiveRank",
    "EigshResult",
    "NoConvergence",
    "SLQResult",
    "SpectralDensity",
    "TraceResult",
    "condition_number",
    "effective_rank",
    "eigsh",
    "slq",
    "spectral_density",
    "tr_f",
    "trace",
    "trace_from_slq",
]
__all__ += ["plotting", "track"]

_MOVED = {"teacher": "lanczos_ntk.experiments.teacher"}  # old attribute -> new module (0.1.0)


def __getattr__(name: str):
    """``lanczos_ntk.teacher`` (the old path of the student–teacher experiment) still resolves,
    with a ``DeprecationWarning``; saved results naming it load through :func:`load_result`.
    """
    if name in _MOVED:
        import importlib

        _warnings.warn(
            f"lanczos_ntk.{name} moved to {_MOVED[name]}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(_MOVED[name])
    raise AttributeError(f"module 'lanczos_ntk' has no attribute {name!r}")
