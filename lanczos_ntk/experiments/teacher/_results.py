"""Configuration and result objects of the student–teacher experiment."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ..._results import Result, Status

Progress = Callable[[int, int], None] | None
ARCHITECTURES = ("ctrnn", "rnn", "gru")


@dataclasses.dataclass(frozen=True)
class TeacherConfig(Result):
    """Every setting of the experiment (defaults: the lead's prototype, about 30 seconds on CPU).

    Problem: ``state_size`` ``n``, ``trials`` ``B``, ``trial_steps`` ``T``, Euler step ``dt``,
    ``pulse_steps`` input steps, ``noise`` ``σ`` of ``W₀``, gain factors ``teacher_gain`` and
    ``student_gain`` (the pitchfork of the trivial point is at factor 1).
    Training: ``optimizer`` ``"sgd"`` or ``"lrng"``, ``lr``, ``num_steps``, ``record_every``;
    LRNG ``rank``, ``refresh_every``, ``damping`` (``0``: the bulk level ``λ_{k+1}``).
    Spectra: ``top_k`` eigenvalues of ``G``; ``spectrum`` ``"dense"`` (all of ``G`` from ``P``
    products on the dual, exact ranks), ``"lanczos"`` (warm-started :func:`lanczos_ntk.eigsh`
    and deflated-SLQ ranks) or ``"auto"`` (dense when ``P <= 256``); ``tol`` of the eigensolver.
    Comparison: ``compare_lr``, ``compare_steps``, ``compare_record_every``; a spike is a jump
    of the loss above ``spike_factor`` times its running minimum.
    Landscape: ``landscape_points`` per side, ``landscape_steps`` (trial length of the probe;
    longer than ``T`` to reach the asymptotic ``1/λ_c²`` regime), stable-side ``|λ_c|`` from
    ``landscape_mu_min`` to ``landscape_mu_max``; the power law is fitted where
    ``|λ_c| T dt >= landscape_fit_min``.
    ``architecture``: ``"ctrnn"`` (a flow, the default), ``"rnn"`` (:class:`DiscreteRNN`,
    ``h ↦ tanh(W h + U u + b)``) or ``"gru"`` (:class:`GRU` with zero gate weights, whose
    origin has the multipliers ``½ + ¼ eig(W_h)``); each teacher/student pair puts the trivial
    point's pitchfork at gain factor 1 (``λ_c = factor - 1`` for the CTRNN, multiplier
    ``factor`` for the RNN and ``(1 + factor)/2`` for the GRU).
    """

    state_size: int = 8
    trials: int = 16
    trial_steps: int = 40
    dt: float = 0.2
    pulse_steps: int = 5
    noise: float = 0.3
    teacher_gain: float = 2.0
    student_gain: float = 0.6
    optimizer: str = "sgd"
    lr: float = 0.1
    num_steps: int = 40
    record_every: int = 1
    rank: int = 4
    refresh_every: int = 10
    damping: float = 0.0
    top_k: int = 6
    spectrum: str = "auto"
    tol: float = 1e-8
    compare_lr: float = 0.5
    compare_steps: int = 400
    compare_record_every: int = 5
    spike_factor: float = 10.0
    landscape_points: int = 12
    landscape_steps: int = 1000
    landscape_mu_min: float = 0.01
    landscape_mu_max: float = 0.6
    landscape_fit_min: float = 10.0
    seed: int = 0
    architecture: str = "ctrnn"

    def __post_init__(self):
        """Refuse settings outside their domain, naming the key."""
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"expected architecture in {ARCHITECTURES}, got {self.architecture!r}")
        if self.optimizer not in ("sgd", "lrng"):
            raise ValueError(f"expected optimizer 'sgd' or 'lrng', got {self.optimizer!r}")
        if self.spectrum not in ("auto", "dense", "lanczos"):
            raise ValueError(f"expected spectrum 'auto', 'dense' or 'lanczos', got {self.spectrum!r}")
        for name in (
            "state_size",
            "trials",
            "trial_steps",
            "num_steps",
            "record_every",
            "top_k",
            "rank",
            "refresh_every",
            "compare_steps",
            "compare_record_every",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"expected {name} >= 1, got {getattr(self, name)}")
        if not 0 <= self.pulse_steps <= self.trial_steps:
            raise ValueError(f"expected 0 <= pulse_steps <= trial_steps, got {self.pulse_steps}")
        if self.lr <= 0 or self.compare_lr <= 0 or self.dt <= 0:
            raise ValueError("expected positive lr, compare_lr and dt")


@dataclasses.dataclass(frozen=True)
class Crossing(Result):
    """First learned bifurcation, read from the dynamics only (see :func:`detect_crossing`).

    ``step``: interpolated training step where the leading eigenvalue of the tracked fixed point
    reaches the threshold (``None`` if it never does); ``index``: the first record at or past it;
    ``stable_change_step``: first recorded step whose number of stable fixed points differs from
    the first record's; ``recrossings``: later returns below the threshold (training undoing
    the bifurcation, e.g. after a loss spike).
    """

    step: float | None
    index: int | None
    stable_change_step: int | None
    recrossings: int


@dataclasses.dataclass(frozen=True)
class StudentTeacherResult(Result):
    """One training run with its spectra and dynamics (``R`` records, ``S = num_steps``).

    Attributes
    ----------
    loss : Tensor ``[S + 1]``
        Loss before each update, and after the last one.
    steps : Tensor ``[R]`` (long)
        Recorded steps (``0, record_every, …, S``).
    eigenvalues : Tensor ``[R, k]``
        Top eigenvalues of ``G``, descending.
    participation, entropy : Tensor ``[R]``
        Effective ranks of ``G`` (exact with the dense spectrum, deflated-SLQ estimates otherwise).
    leading : Tensor ``[R]``
        ``Re λ`` of the leading Jacobian eigenvalue at the trivial fixed point (tracked by
        continuity from the origin).
    fixed_point_leading : tuple of Tensor ``[F_r]``
        ``Re λ`` of the leading eigenvalue of every fixed point found at record ``r``.
    num_fixed_points, num_stable : Tensor ``[R]`` (long)
    channel_cos : Tensor ``[R]``
        ``|cos(u₁, ĝ)|``, the top eigenvector of ``G`` against the bifurcation channel.
    sensitivity_cos : Tensor ``[R]``
        ``|cos(u₁, d̂)|`` against the eigenvalue-sensitivity (unfolding) direction.
    channel_eigenvalue : Tensor ``[R]``
        ``ĝᵀ G ĝ = λ_max(K_bif)``.
    crossing : Crossing
    collapse : dict
        ``min_step`` (participation-ratio minimum), ``steepest_step`` (largest drop per step,
        midpoint of the interval), ``half_step`` (first at half the drop), see
        :func:`collapse_steps`.
    theta_ref : Tensor ``[P]``
        Student parameters at the last record before the crossing (or the last record).
    top_vector_at_crossing : Tensor ``[P]``
        ``u₁`` at the first record past the crossing (or the last record).
    spikes : int
        Loss spikes after the crossing (:func:`count_spikes`).
    max_loss_after_crossing, final_loss : float
    max_loss_after_fit : float
        Largest loss after the loss first fell below 1% of its initial value (NaN if never).
    seconds_train, seconds_record : float
        Wall-clock time in the training steps and in the recording.
    sensitivity_eigenvalue : Tensor ``[R]``
        ``d̂ᵀ G d̂``: the kernel restricted to the unfolding direction ``d = dλ_c/dθ`` (the
        paper's bifurcation parameter), against ``channel_eigenvalue`` along ``g``.
    gradient_channel_cos, gradient_sensitivity_cos : Tensor ``[R]``
        ``|cos|`` of the loss gradient with ``span(g)`` and with ``d``: which channel training
        actually uses.
    block_sensitivity_cos, block_participation : Tensor ``[R]``
        In the block of ``G`` over the recurrent and input weights (``W`` and ``U``):
        ``|cos|`` of ``d`` (restricted to the block) with the block's top eigenvector, and the
        block's participation ratio (NaN when the block has more than 512 parameters and the
        spectrum is not dense).
    update_bias_share : Tensor ``[S]``
        ``‖Δb‖ / ‖Δθ‖`` of every update: how much of each step goes into the biases.
    spike_onsets : tuple of int
        Loss indices where a spike starts (:func:`spike_onsets`).
    """

    config: TeacherConfig
    optimizer: str
    lr: float
    loss: torch.Tensor
    steps: torch.Tensor
    eigenvalues: torch.Tensor
    participation: torch.Tensor
    entropy: torch.Tensor
    leading: torch.Tensor
    fixed_point_leading: tuple
    num_fixed_points: torch.Tensor
    num_stable: torch.Tensor
    channel_cos: torch.Tensor
    sensitivity_cos: torch.Tensor
    channel_eigenvalue: torch.Tensor
    crossing: Crossing
    collapse: dict
    theta_ref: torch.Tensor
    top_vector_at_crossing: torch.Tensor
    param_names: tuple
    spikes: int
    max_loss_after_crossing: float
    max_loss_after_fit: float
    final_loss: float
    spectrum_method: str
    num_matvecs: int
    seconds_train: float
    seconds_record: float
    seed: int
    status: Status
    message: str = ""
    sensitivity_eigenvalue: torch.Tensor | None = None
    gradient_channel_cos: torch.Tensor | None = None
    gradient_sensitivity_cos: torch.Tensor | None = None
    block_sensitivity_cos: torch.Tensor | None = None
    block_participation: torch.Tensor | None = None
    update_bias_share: torch.Tensor | None = None
    spike_onsets: tuple = ()


@dataclasses.dataclass(frozen=True)
class ChannelLandscape(Result):
    """The channel eigenvalue along ``θ(s) = θ_ref + s d̂`` (see :func:`channel_landscape`).

    ``s`` ``[N]`` offsets, ``mu`` ``[N]`` the leading eigenvalue of the trivial point at each,
    ``s_c`` the interpolated crossing; ``lambda_bif`` ``[N]`` ``= ĝ(s)ᵀ G ĝ(s)`` (exact),
    ``lambda_max`` ``[N]`` of ``G``, ``predicted`` ``[N]`` the finite-``T`` linear-response
    prediction (stable side; NaN elsewhere); ``exponent ± exponent_se`` the log-log slope of
    ``lambda_bif`` against ``|s - s_c|`` over the stable points with
    ``|μ| T dt >= config.landscape_fit_min``,
    ``predicted_exponent`` the same fit of ``predicted`` (the finite-``T`` reference; ``-2`` is
    the ``T → ∞`` normal form), ``ratio`` the median of ``lambda_bif / predicted`` there.

    Along the paper's direction: ``lambda_d`` ``[N]`` ``= ‖J d̂(s)‖²`` (exact, ``d = dλ_c/dθ`` at
    each point), ``normal_form`` ``[N]`` the same from the scalar normal form on the center
    manifold, ``c ← c + s(μ c + a₂ c² + k₃ c³ + wᴴ f_u u_t)`` driven by the trials' pulses
    (``a₂ = ½ wᴴ D²f[v,v]``, ``k₃ = ⅙ wᴴ D³f[v,v,v]``, ``s = dt`` for a flow, 1 for a map;
    ``λ_d ≈ ‖d‖² Σ_{b,t} (∂c_t/∂μ)²``), ``exponent_d``, ``normal_form_exponent`` their
    log-log slopes over the same points and ``ratio_d`` the median of
    ``lambda_d / normal_form`` there; ``normal_form_nonlinearity`` ``[N]`` how far the pulses
    drive the critical coordinate out of the normal form's small-amplitude range
    (:func:`normal_form_response`).
    """

    s: torch.Tensor
    mu: torch.Tensor
    s_c: float
    slope: float
    lambda_bif: torch.Tensor
    lambda_max: torch.Tensor
    predicted: torch.Tensor
    fit_mask: torch.Tensor
    exponent: float
    exponent_se: float
    predicted_exponent: float
    ratio: float
    trial_steps: int
    seed: int
    lambda_d: torch.Tensor | None = None
    normal_form: torch.Tensor | None = None
    exponent_d: float = math.nan
    normal_form_exponent: float = math.nan
    ratio_d: float = math.nan
    normal_form_nonlinearity: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class OptimizerComparison(Result):
    """SGD against the low-rank natural gradient at the same learning rate.

    ``seconds_per_step`` and ``overhead`` (LRNG / SGD) time the training steps only (forward,
    backward, update, LRNG refreshes included), not the recording.
    """

    sgd: StudentTeacherResult
    lrng: StudentTeacherResult
    lr: float
    seconds_per_step: dict
    overhead: float


@dataclasses.dataclass(frozen=True)
class TeacherExperiment(Result):
    """Everything :func:`run_experiment` computes: the collapse run, the landscape, the comparison."""

    config: TeacherConfig
    collapse: StudentTeacherResult
    landscape: ChannelLandscape
    comparison: OptimizerComparison
    summary: dict
