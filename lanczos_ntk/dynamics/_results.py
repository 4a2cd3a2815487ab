"""Result objects of the dynamics module: fixed points, bifurcations and branches."""

from __future__ import annotations

import dataclasses

import torch

from .._results import Result, Status

__all__ = ["BIFURCATION_KINDS", "Bifurcation", "Branch", "FixedPoints"]

BIFURCATION_KINDS = ("fold", "branch_point", "hopf", "flip", "neimark_sacker")


def _raise_for(result, what: str):
    if result.status not in (Status.CONVERGED, Status.MAX_ITERATIONS):
        raise RuntimeError(f"{what} {result.status.value}: {result.message}")
    return result


@dataclasses.dataclass(frozen=True)
class FixedPoints(Result):
    """Fixed points found by :func:`find_fixed_points`.

    Attributes
    ----------
    points : tensor ``[F, n]``
        Distinct fixed points (``F`` may be 0).
    residuals : tensor ``[F]``
        ``‖G(x*)‖_∞`` (``G = f`` for a flow, ``f - x`` for a map).
    eigenvalues : complex tensor ``[F, n]``
        Eigenvalues of ``∂f/∂x`` (multipliers for a map), most unstable first
        (decreasing real part for a flow, decreasing modulus for a map).
    stable : bool tensor ``[F]``
        All ``Re λ < 0`` (flow) or all ``|μ| < 1`` (map).
    n_unstable : long tensor ``[F]``
        Number of unstable eigenvalues.
    counts : long tensor ``[F]``
        How many seeds converged to each point.
    input_index : long tensor ``[F]``
        Which of the constant inputs the point belongs to (0 when only one input).
    p : float
        Parameter value.
    kind : str
    num_seeds, num_converged : int
    status : Status
        ``CONVERGED`` when at least one fixed point was found, ``FAILED`` otherwise.
    message : str
    config : dict
        The settings used (``opt_steps``, ``newton_steps``, ``tol``, ``dedup_tol``, ``seed`` of the
        generator).
    dt : float or None
        The Euler step of a simulated flow (:class:`~lanczos_ntk.dynamics.System`), else None.
    euler_max_multiplier : tensor ``[F]`` or None
        ``max |1 + dt λ|``: the largest multiplier of the Euler map ``x ↦ x + dt f(x)``, which
        the simulated trajectories (and the kernel) follow.
    euler_stable : bool tensor ``[F]`` or None
        ``euler_max_multiplier < 1``. It can be false where ``stable`` is true (a stiff or
        weakly damped oscillatory mode with ``|1 + dt λ| > 1``).
    """

    points: torch.Tensor
    residuals: torch.Tensor
    eigenvalues: torch.Tensor
    stable: torch.Tensor
    n_unstable: torch.Tensor
    counts: torch.Tensor
    input_index: torch.Tensor
    p: float
    kind: str
    num_seeds: int
    num_converged: int
    status: Status
    message: str = ""
    config: dict = dataclasses.field(default_factory=dict)
    dt: float | None = None
    euler_max_multiplier: torch.Tensor | None = None
    euler_stable: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def raise_for_status(self) -> FixedPoints:
        """Raise ``RuntimeError`` unless the search converged; return ``self`` otherwise."""
        return _raise_for(self, "fixed-point search")


@dataclasses.dataclass(frozen=True)
class Bifurcation(Result):
    r"""A located codimension-one bifurcation with its critical data.

    Normalisations: ``‖v‖ = 1`` with its largest-modulus entry real and positive, ``wᴴ v = 1``
    (Kuznetsov's ``⟨q, q⟩ = 1``, ``⟨p, q⟩ = 1``). ``v`` and ``w`` are real for fold, branch
    point and flip; complex (eigenvalue with positive imaginary part) for Hopf / Neimark–Sacker.

    Attributes
    ----------
    kind : {"fold", "branch_point", "hopf", "flip", "neimark_sacker"}
    p : float
        Parameter value.
    x : tensor ``[n]``
        State.
    eigenvalue : complex
        Critical eigenvalue of ``A = ∂f/∂x`` (``0``, ``iω``; multiplier ``1``, ``-1``, ``e^{iθ}``).
    eigenvalues : complex tensor ``[n]``
        All eigenvalues of ``A`` at the point, most unstable first.
    v, w : tensor ``[n]``
        Right and left critical eigenvectors (``A v = λ v``, ``wᴴ A = λ wᴴ``).
    coefficients : dict[str, float]
        fold / branch point: ``a = ½ wᴴ B(v, v)``; Hopf: first Lyapunov coefficient ``l1``
        (Kuznetsov 2004, eq. 3.20 and its n-dimensional form in §5.4) and ``omega``; flip:
        ``c = ⅙ wᴴ[C(v,v,v) + 3 B(v, (I - A)^{-1} B(v, v))]`` (normal form ``η ↦ -η + c η³``,
        ``c > 0`` supercritical); Neimark–Sacker: ``d`` (Kuznetsov §5.4, normal form
        ``z ↦ e^{iθ} z (1 + d|z|²)``, ``d < 0`` supercritical) and ``theta``. All with the
        normalisation above (``a`` scales with ``‖v‖``, ``l1``, ``c``, ``d`` with ``‖v‖²``); e.g.
        ``ẋ = -y - x(x²+y²), ẏ = x - y(x²+y²)`` gives ``l1 = -2`` here and ``-1`` in the
        convention ``z = x + iy`` (``‖q‖² = ½``).
    sensitivities : dict[str, tensor]
        ``∂λ_c/∂θ = wᴴ (∂A/∂θ) v / (wᴴ v)`` at fixed ``x``, one complex tensor per model
        parameter (real tensors for fold, branch point and flip; empty for a plain ``f``).
    sensitivities_total : dict[str, tensor] or None
        ``dλ_c/dθ`` along the branch of fixed points (the fixed point moves with ``θ``;
        :func:`~lanczos_ntk.dynamics.eigenvalue_derivatives`). ``None`` where it does not
        exist: at a fold or a transcritical branch point ``A - cI`` is singular and the branch
        turns or crosses another; at Hopf, flip and Neimark–Sacker points it exists.
    eigenvalue_dp : complex or None
        ``∂λ_c/∂p = wᴴ (∂A/∂p) v / (wᴴ v)`` at fixed ``x`` (None when critical data was not
        requested: then ``v``, ``w``, ``g`` are empty too).
    g : tensor ``[k, P]``
        Critical parameter direction ``(∂f/∂θ)ᵀ w`` flattened over ``param_names``;
        ``k = 1`` (real ``w``) or ``2`` (rows: real and imaginary parts of ``w``).
    param_names : list[str]
    param_numels : list[int]
    residual : float
        ``‖G(x, p)‖_∞`` at the located point.
    test_value : float
        Test function at the located point.
    p_accuracy : float
        Bound on the location error in ``p`` from the root-finder's bracket.
    index : int
        The bifurcation lies between branch points ``index`` and ``index + 1``.
    n_unstable_before, n_unstable_after : int
        Unstable eigenvalue counts at the bracketing branch points.
    """

    kind: str
    p: float
    x: torch.Tensor
    eigenvalue: complex
    eigenvalues: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    coefficients: dict
    sensitivities: dict
    eigenvalue_dp: complex | None
    g: torch.Tensor
    param_names: list
    param_numels: list
    residual: float
    test_value: float
    p_accuracy: float
    index: int
    n_unstable_before: int
    n_unstable_after: int
    sensitivities_total: dict | None = None


@dataclasses.dataclass(frozen=True)
class Branch(Result):
    """A branch of fixed points traced by :func:`continuation`.

    Attributes
    ----------
    points : tensor ``[N, n]``
    p : tensor ``[N]``
    stable : bool tensor ``[N]``
    n_unstable : long tensor ``[N]``
        Number of eigenvalues with ``Re λ > 0`` (flow) or ``|μ| > 1`` (map).
    leading_eigenvalues : complex tensor ``[N, k]``
        The ``k`` most unstable eigenvalues (``k = min(n, 6)``).
    tangents : tensor ``[N, n + 1]``
        Unit tangents in ``(x, p)``.
    bifurcations : list[Bifurcation]
        In the order met along the branch.
    kind : str
    status : Status
        ``CONVERGED`` (left the window), ``MAX_ITERATIONS`` (``max_steps`` taken), ``PARTIAL``
        (stopped early; ``points`` holds what was computed), ``FAILED`` (no start point).
    message : str
    num_steps : int
    config : dict
        The settings used (``p_span``, ``ds``, ``ds_min``, ``ds_max``, ``max_steps``,
        ``direction``, ``tol``, ``locate_tol``).
    dt, euler_max_multiplier, euler_stable :
        For a flow simulated by Euler steps: ``dt``, ``max |1 + dt λ|`` at every point and
        whether the Euler map is stable there (see :meth:`euler_stability_changes`); None
        otherwise.
    """

    points: torch.Tensor
    p: torch.Tensor
    stable: torch.Tensor
    n_unstable: torch.Tensor
    leading_eigenvalues: torch.Tensor
    tangents: torch.Tensor
    bifurcations: list
    kind: str
    status: Status
    message: str = ""
    num_steps: int = 0
    config: dict = dataclasses.field(default_factory=dict)
    dt: float | None = None
    euler_max_multiplier: torch.Tensor | None = None
    euler_stable: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def raise_for_status(self) -> Branch:
        """Raise ``RuntimeError`` if the continuation failed or stopped early."""
        return _raise_for(self, "continuation")

    def euler_stability_changes(self) -> list[float]:
        """Parameter values where the Euler map's fixed point gains or loses stability
        (``max |1 + dt λ| = 1``, linear interpolation between branch points); ``[]`` for maps
        and flows without ``dt``. Compare with the flow's (``Re λ = 0``) bifurcations: the
        simulated trajectories, and so the kernel, follow the map.
        """
        if self.euler_max_multiplier is None or len(self) < 2:
            return []
        m = self.euler_max_multiplier.to(torch.float64) - 1.0
        p = self.p.to(torch.float64)
        out = []
        for i in range(len(m) - 1):
            a, b = float(m[i]), float(m[i + 1])
            if (a < 0) != (b < 0):
                out.append(float(p[i] + (p[i + 1] - p[i]) * a / (a - b)))
        return out

    def of_kind(self, kind: str) -> list:
        """The bifurcations of one kind."""
        if kind not in BIFURCATION_KINDS:
            raise ValueError(f"unknown bifurcation kind {kind!r}; expected one of {BIFURCATION_KINDS}")
        return [b for b in self.bifurcations if b.kind == kind]
