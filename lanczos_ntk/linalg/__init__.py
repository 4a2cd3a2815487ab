"""Krylov and randomised linear algebra on matvec closures (imports torch only).

Every routine takes a symmetric operator as a closure ``X [n, k] -> A X`` plus its dimension,
and the dtype / device the closure wants its blocks in; recurrences run in float64.
"""

from ._common import Matmul, NumericalWarning
from ._lanczos import LanczosDecomposition, lanczos
from ._restart import ExtremeEigenpairs, thick_restart_lanczos
from ._slq import QuadratureNodes, lanczos_quadrature
from ._subspace import SubspaceStep, subspace_step
from ._trace import TraceEstimate, hutchinson, hutchpp
from ._verify import Completed, complete_multiplicities

__all__ = [
    "Completed",
    "ExtremeEigenpairs",
    "LanczosDecomposition",
    "Matmul",
    "NumericalWarning",
    "QuadratureNodes",
    "SubspaceStep",
    "complete_multiplicities",
    "TraceEstimate",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_quadrature",
    "subspace_step",
    "thick_restart_lanczos",
]
