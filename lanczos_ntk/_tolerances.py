r"""Every threshold that decides *what counts as what*, in one table.

Each has one meaning, one value and one home; the modules import it from here (and take it as
a keyword argument where a user may need another value). They differ on purpose: rounding and
resolution are different questions.

=========================== =========== ======================================================
name                        value       meaning
=========================== =========== ======================================================
``NULL_EPS_FACTOR``         1000        :func:`lanczos_ntk.eigsh` (``"SA"``): a Ritz value at
                                        or below ``1000 · eps · λ_max`` is in the null space —
                                        zero to the *rounding* of the products (``null_rtol``;
                                        2.2e-13 in float64, 1.2e-4 in float32).
``ZERO_RTOL``               1e-6        densities, numerical ranks, zero mass: an eigenvalue at
                                        or below ``1e-6 · λ_max`` counts as zero — the
                                        *resolution* of a smoothed density or of a rank
                                        (``zero_rtol`` / ``rtol``).
``IMAG_TOL``                1e-10       a Jacobian eigenvalue is complex when
                                        ``|Im λ| > 1e-10 · (1 + |λ|)``: real and complex modes,
                                        Hopf / Neimark–Sacker against fold / flip.
``SAME_POINT_TOL``          1e-6        two fixed points are one when they differ by less than
                                        ``1e-6 · (1 + ‖x‖_∞)`` (``dedup_tol``).
``ON_BRANCH_TOL``           1e-4        a fixed point lies on an already traced branch when it
                                        is within ``1e-4 · (1 + ‖x‖_∞)`` of one of its points
                                        (``bifurcate`` does not trace it again; a continuation
                                        step is much coarser than ``SAME_POINT_TOL``).
=========================== =========== ======================================================
"""

from __future__ import annotations

NULL_EPS_FACTOR = 1000.0
ZERO_RTOL = 1e-6
IMAG_TOL = 1e-10
SAME_POINT_TOL = 1e-6
ON_BRANCH_TOL = 1e-4
