"""lanczos_ntk: matrix-free spectral estimation of the state-space neural tangent kernel."""

from . import models, testing
from ._operator import DualNTK, StateNTK
from ._results import Result, Status, load_result

__version__ = "0.1.0"

__all__ = ["DualNTK", "Result", "StateNTK", "Status", "load_result", "models", "testing"]
