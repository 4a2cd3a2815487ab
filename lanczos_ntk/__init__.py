"""lanczos_ntk: matrix-free spectral estimation of the state-space neural tangent kernel."""

from . import models
from ._results import Result, Status, load_result

__version__ = "0.1.0"

__all__ = ["Result", "Status", "load_result", "models"]
