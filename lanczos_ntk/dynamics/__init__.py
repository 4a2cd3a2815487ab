"""Fixed points, pseudo-arclength continuation and codimension-one bifurcations.

Systems are flows ``dx/dt = f(x, p)`` or maps ``x ↦ f(x, p)`` with a scalar parameter ``p``:
plain callables, :class:`System` objects, or models of :mod:`lanczos_ntk.models` held at a
constant input (:func:`system_from_model`).

- :func:`find_fixed_points`: many seeds, Levenberg–Marquardt on ``½‖G‖²`` then Newton
  (Sussillo & Barak 2013), deduplicated, with eigenvalues and stability.
- :func:`continuation`: Keller's pseudo-arclength continuation with detection and location of
  folds, branch points, Hopf, flip and Neimark–Sacker points, each with its critical
  eigenvectors, normal-form coefficient, eigenvalue sensitivities ``∂λ_c/∂θ`` (at fixed ``x``
  and along the branch) and critical parameter direction ``g = (∂f/∂θ)ᵀ w`` (Kuznetsov 2004).
- :func:`critical_data`: the same critical data at any given point.
- :func:`eigenvalue_derivatives`: partial and total derivatives of a critical eigenvalue, the
  one implementation behind the dynamics, :mod:`lanczos_ntk.channels` and the experiment.
"""

from ._continuation import continuation
from ._critical import critical_data, eigen_counts, eigenvalue_derivatives, sort_eigenvalues
from ._fixed_points import find_fixed_points, trajectory_seeds
from ._results import BIFURCATION_KINDS, Bifurcation, Branch, FixedPoints
from ._system import System, as_system, system_from_model

__all__ = [
    "BIFURCATION_KINDS",
    "Bifurcation",
    "Branch",
    "FixedPoints",
    "System",
    "as_system",
    "continuation",
    "critical_data",
    "eigen_counts",
    "eigenvalue_derivatives",
    "find_fixed_points",
    "sort_eigenvalues",
    "system_from_model",
    "trajectory_seeds",
]
