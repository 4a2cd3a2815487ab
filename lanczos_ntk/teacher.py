r"""Student–teacher experiment: a student learns a pitchfork, and its sNTK collapses on the way.

**Setup.** A teacher CTRNN ``dh/dt = -h + W tanh(h) + B u + b`` with
``W_T = 2 W₀ / ℓ`` (``W₀ = σ N(0,1)/√n + m mᵀ``, ``‖m‖ = 1``, ``ℓ`` the leading real eigenvalue of
``W₀``) has an unstable origin and two stable states ``±x*``: the trivial fixed point went
through a pitchfork at gain factor 1. The student starts at ``W_S = 0.6 W₀ / ℓ`` (origin
stable, leading Jacobian eigenvalue ``λ_c = -1 + 0.6 = -0.4``), ``B = m``, ``b = 0``. Trials are
pulses ``u_t = a`` for ``t < 5`` with ``a ∈ linspace(-1, 1, B)``, then zero; the targets are the
teacher's states, the loss the mean squared error over all ``M = B T n`` states. To fit them the
student must *learn the bifurcation*: ``λ_c`` has to cross zero.

**What is recorded.** At every ``record_every``-th step: the loss, the top eigenvalues of the
parameter Gram ``G = Jᵀ J`` (the dual of the sNTK), its participation ratio
``(Σλ)²/Σλ²`` and entropy rank ``exp(-Σ p log p)``, the student's fixed points at zero input
with their leading eigenvalues, the bifurcation channel ``g = (∂f/∂θ)ᵀ w`` at the trivial
fixed point (:func:`lanczos_ntk.channels.critical_direction`), the channel eigenvalue
``ĝᵀ G ĝ`` and the alignment ``|cos(u₁, ĝ)|`` of the top eigenvector ``u₁`` of ``G``. The
crossing is read from the dynamics alone (:func:`detect_crossing`), independently of the
kernel, and compared with the collapse of the effective rank (:func:`collapse_steps`).

**The landscape along the unfolding direction.** Near a pitchfork the critical coordinate
obeys the normal form ``ċ = μ c - κ c³ + β``: ``μ = λ_c`` is moved by the eigenvalue
sensitivity ``d = dλ_c/dθ`` along the branch of the trivial point (at the origin of the odd
CTRNN it equals ``∂λ_c/∂θ = (∂A/∂θ)ᵀ(w vᵀ)``, the ``W``-block ``w vᵀ``) and the imperfection
``β = wᵀ δb`` by the channel ``g`` (at the origin, the ``b``-block ``w``). On the line
``θ(s) = θ_ref + s d̂`` the trivial point stays put and ``λ_c(s) ≈ λ_c(0) + s ‖d‖`` is linear,
and the linear response of the critical coordinate to a
constant ``β`` saturates at ``β/|λ_c|``, so on the stable side

.. math::  ĝᵀ G ĝ ≈ B ‖v‖² ‖g‖² Σ_{t≤T} |dt (1 - m^t)/(1 - m)|²  →  B T ‖g‖² / λ_c²,
           \qquad m = 1 + dt\,λ_c,

a power law ``|s - s_c|^{-2}`` once ``|λ_c| T dt ≫ 1`` (:func:`channel_landscape`; the finite-T
sum is :func:`lanczos_ntk.channels.predicted_channel_eigenvalue`). On the unstable side the
response grows like ``e^{λ_c t}`` until the nonlinearity saturates it.

**Optimizers.** Once the channel is amplified, SGD with ``η`` is unstable along it when
``η (2/M) λ_max(G) > 2``; :func:`compare_optimizers` trains SGD and
:class:`lanczos_ntk.optim.LowRankNaturalGradient` at the same ``η`` and counts loss spikes.

Everything here is deterministic given ``config.seed`` (or an explicit ``torch.Generator``);
nothing prints; ``progress`` callbacks receive ``(done, total)``.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ._results import Result, Status
from .channels import (
    _rhs_with,
    critical_direction,
    fit_power_law,
    predicted_channel_eigenvalue,
    real_mode_coefficients,
)
from .dynamics import find_fixed_points
from .dynamics._critical import is_complex
from .models import CTRNN, GRU, DiscreteRNN
from .operators import ParamSpec, StateNTK
from .optim import LowRankNaturalGradient
from .spectral import deflated_slq, effective_rank, eigsh
from .track import first_crossing, train_tracked

__all__ = [
    "ARCHITECTURES",
    "ChannelLandscape",
    "Crossing",
    "OptimizerComparison",
    "Problem",
    "SeedStudy",
    "StudentTeacherResult",
    "StudyRow",
    "TeacherConfig",
    "TeacherExperiment",
    "TrackedRun",
    "build_problem",
    "channel_landscape",
    "collapse_steps",
    "compare_optimizers",
    "count_spikes",
    "detect_crossing",
    "normal_form_response",
    "run_experiment",
    "run_seeds",
    "run_student_teacher",
    "run_summary",
    "run_tracked",
    "spike_bias_share",
    "spike_onsets",
    "summarize",
]

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
        In the block of ``G`` over the recurrent and input weights (``W`` and ``B`` or ``U``):
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


# ----------------------------------------------------------------------------------- setup
@dataclasses.dataclass
class Problem:
    """Teacher, student, inputs ``[B, T, 1]``, targets ``[B, T, n]`` and the mode direction ``m``."""

    teacher: torch.nn.Module
    student: torch.nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    m: torch.Tensor
    W0: torch.Tensor


def _generator(config: TeacherConfig, generator: torch.Generator | None) -> torch.Generator:
    if generator is not None:
        return generator
    g = torch.Generator()
    g.manual_seed(int(config.seed))
    return g


def pulse_inputs(trials: int, steps: int, pulse_steps: int, dtype=torch.float64) -> torch.Tensor:
    """``[trials, steps, 1]``: amplitude ``linspace(-1, 1, trials)`` on the first ``pulse_steps``."""
    u = torch.zeros(trials, steps, 1, dtype=dtype)
    u[:, :pulse_steps, 0] = torch.linspace(-1.0, 1.0, trials, dtype=dtype)[:, None]
    return u


def build_problem(config: TeacherConfig, generator: torch.Generator | None = None) -> Problem:
    """Draw ``m`` and ``W₀`` from ``generator`` (default: seeded with ``config.seed``).

    The recurrent weights are ``W₀ · factor · c / ℓ`` with ``c = 1`` (CTRNN, RNN) or ``2``
    (GRU: the candidate block ``W_h``; the gates' weights and all biases zero) so that the
    trivial point's leading eigenvalue crosses the stability boundary at factor 1; the input
    weights of the state (candidate) are ``m``.
    """
    gen = _generator(config, generator)
    n = int(config.state_size)
    m = torch.randn(n, generator=gen, dtype=torch.float64)
    m = m / torch.linalg.vector_norm(m)
    W0 = config.noise * torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    W0 = W0 + torch.outer(m, m)
    eig = torch.linalg.eigvals(W0)
    real = eig[~is_complex(eig)].real
    if real.numel() == 0 or float(real.max()) <= 0:
        raise ValueError("W0 has no positive real eigenvalue; lower config.noise or change the seed")
    lead = float(real.max())
    arch = config.architecture

    def make(factor):
        if arch == "ctrnn":
            model = CTRNN(n, 1, dt=config.dt, gain=factor)
        elif arch == "rnn":
            model = DiscreteRNN(n, 1, gain=factor)
        else:
            model = GRU(n, 1, gain=factor)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
            if arch == "gru":
                model.W[2 * n :].copy_(W0 * 2 * factor / lead)
                model.U[2 * n :].copy_(m[:, None])
            else:
                model.W.copy_(W0 * factor / lead)
                (model.B if arch == "ctrnn" else model.U).copy_(m[:, None])
        return model

    teacher, student = make(config.teacher_gain), make(config.student_gain)
    for p in teacher.parameters():
        p.requires_grad_(False)
    inputs = pulse_inputs(config.trials, config.trial_steps, config.pulse_steps)
    with torch.no_grad():
        targets = teacher(inputs)
    return Problem(teacher, student, inputs, targets, m, W0)


# ----------------------------------------------------------------------------- detectors
def detect_crossing(steps, leading, num_stable=None, *, threshold: float = 0.0) -> Crossing:
    """First upward crossing of ``threshold`` (``0`` for a flow) by the leading eigenvalue.

    The crossing step is linearly interpolated between the two records around it. A series that
    starts at or above the threshold has no crossing. ``num_stable`` (optional) gives the first
    step where the number of stable fixed points changes.

    >>> c = detect_crossing([0, 1, 2, 3], [-0.3, -0.1, 0.1, 0.3])
    >>> round(c.step, 6), c.index
    (1.5, 2)
    """
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(leading, dtype=torch.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"expected steps and leading of the same length, got {s.numel()} and {y.numel()}")

    hit = first_crossing(s, y, threshold)
    step, index = hit if hit is not None else (None, None)
    below = y < threshold
    recross = 0
    if index is not None:
        b = below[index:].to(torch.int64)
        recross = int(((b[1:] - b[:-1]) == 1).sum())
    change = None
    if num_stable is not None:
        ns = torch.as_tensor(num_stable).reshape(-1)
        diff = torch.nonzero(ns != ns[0]).reshape(-1)
        change = int(s[int(diff[0])]) if diff.numel() else None
    return Crossing(step=step, index=index, stable_change_step=change, recrossings=recross)


def collapse_steps(steps, rank) -> dict:
    """Where the effective rank collapses: its minimum, its steepest drop, its half-drop point.

    ``steepest_step`` is the midpoint of the interval with the most negative
    ``Δrank / Δstep`` before the minimum; ``half_step`` the interpolated first step where the
    rank reaches ``(rank[0] + min)/2``.

    >>> collapse_steps([0, 1, 2, 3, 4], [5.0, 4.5, 3.0, 2.0, 2.5])["min_step"]
    3
    """
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(rank, dtype=torch.float64).reshape(-1)
    i_min = int(torch.argmin(r))
    out = {
        "min_step": int(s[i_min]),
        "min_value": float(r[i_min]),
        "initial": float(r[0]),
        "steepest_step": float(s[0]),
        "half_step": float(s[0]),
    }
    if i_min == 0:
        return out
    slope = (r[1 : i_min + 1] - r[:i_min]) / (s[1 : i_min + 1] - s[:i_min])
    j = int(torch.argmin(slope))
    out["steepest_step"] = float(0.5 * (s[j] + s[j + 1]))
    half = 0.5 * (float(r[0]) + float(r[i_min]))
    for i in range(1, i_min + 1):
        if float(r[i]) <= half:
            y0, y1 = float(r[i - 1]), float(r[i])
            frac = (half - y0) / (y1 - y0) if y1 != y0 else 1.0
            out["half_step"] = float(s[i - 1] + frac * (s[i] - s[i - 1]))
            break
    return out


def spike_onsets(loss, *, factor: float = 10.0, start: int = 0) -> list[int]:
    """Indices ``t > start`` where ``loss[t] > factor · min(loss[start:t])`` starts to hold.

    >>> spike_onsets([1.0, 0.1, 0.01, 1.0, 0.5, 0.01, 0.001, 1.0])
    [3, 7]
    """
    y = torch.as_tensor(loss, dtype=torch.float64).reshape(-1)[int(start) :]
    if y.numel() < 2:
        return []
    run = torch.cummin(y, dim=0).values
    high = torch.zeros_like(y, dtype=torch.bool)
    high[1:] = y[1:] > factor * run[:-1]
    edges = high[1:] & ~high[:-1]
    return [int(i) + 1 + int(start) for i in torch.nonzero(edges).reshape(-1)]


def count_spikes(loss, *, factor: float = 10.0, start: int = 0) -> int:
    """Rising edges of ``loss[t] > factor · min(loss[start:t])`` for ``t > start``.

    >>> count_spikes([1.0, 0.1, 0.01, 1.0, 0.5, 0.01, 0.001, 1.0])
    2
    """
    return len(spike_onsets(loss, factor=factor, start=start))


# ------------------------------------------------------------------------------- spectra
def _flat_params(model, names):
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names])


def _load_flat(model, names, theta):
    named = dict(model.named_parameters())
    offset = 0
    with torch.no_grad():
        for n in names:
            p = named[n]
            p.copy_(theta[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def _method(config: TeacherConfig, P: int) -> str:
    if config.spectrum == "auto":
        return "dense" if P <= 256 else "lanczos"
    return config.spectrum


class _Spectrum:
    """Top eigenpairs and effective ranks of ``G`` at the current parameters (warm-started)."""

    def __init__(self, config: TeacherConfig, P: int, generator: torch.Generator):
        self.k = min(int(config.top_k), P)
        self.method = _method(config, P)
        self.tol = float(config.tol)
        self.generator = generator
        self.v0 = None
        self.num_matvecs = 0
        self.probes, self.lanczos_steps = 16, 40

    def __call__(self, G) -> tuple[torch.Tensor, torch.Tensor, float, float, Callable]:

        P = G.shape[0]
        if self.method == "dense":
            eye = torch.eye(P, dtype=G.dtype)
            Gd = G.matmul(eye).to(torch.float64)
            Gd = 0.5 * (Gd + Gd.T)
            lam, V = torch.linalg.eigh(Gd)
            lam, V = lam.flip(0), V.flip(1)
            self.num_matvecs += P
            pos = lam.clamp_min(0.0)
            pr = float(pos.sum() ** 2 / (pos**2).sum())
            p = pos / pos.sum()
            p = p[p > 0]
            ent = float(torch.exp(-(p * p.log()).sum()))
            return lam[: self.k], V[:, : self.k], pr, ent, lambda X: Gd @ X
        res = eigsh(
            G,
            k=self.k,
            which="LA",
            tol=self.tol,
            return_eigenvectors=True,
            v0=self.v0,
            generator=self.generator,
        )
        self.v0 = res.eigenvectors
        # the top eigenpairs just found, exactly, and SLQ on the rest: both ranks from one run
        quad = deflated_slq(
            G,
            self.probes,
            min(self.lanczos_steps, P),
            generator=self.generator,
            tol=self.tol,
            eigenpairs=res,
            side="primal",
        )
        ranks = [effective_rank(quad, kind=kind) for kind in ("participation", "entropy")]
        self.num_matvecs += int(res.num_matvecs) + int(quad.num_matvecs)
        return (
            res.eigenvalues,
            res.eigenvectors,
            float(ranks[0].value),
            float(ranks[1].value),
            lambda X: G.matmul(X.to(G.dtype)).to(torch.float64),
        )


def _critical(student, x, names):
    """``(ĝ basis [P, r], d̂ [P], λ_c, direction)`` at the fixed point ``x`` (zero input)."""
    cd = critical_direction(student, x, params=names)
    g = cd.g.to(torch.float64)
    Q, _ = torch.linalg.qr(g)
    return Q, cd.d[:, 0].to(torch.float64), cd  # d: d Re λ_c / dθ along the branch


def _trivial_point(student, prev: torch.Tensor, seeds: torch.Tensor, generator):
    """Fixed points at zero input, and the index of the one nearest ``prev`` (the trivial branch)."""
    u = torch.zeros(student.input_size, dtype=torch.float64)
    fp = find_fixed_points(student, seeds, u=u, generator=generator, opt_steps=40, newton_steps=8)
    if len(fp) == 0:
        return fp, None
    i = int(torch.argmin(torch.linalg.vector_norm(fp.points - prev, dim=1)))
    return fp, i


# ----------------------------------------------------------------------------- training
def _make_optimizer(config, student, inputs, optimizer, lr, generator):
    if optimizer == "sgd":
        return torch.optim.SGD(student.parameters(), lr=lr)

    return LowRankNaturalGradient(
        student,
        inputs,
        lr=lr,
        rank=config.rank,
        refresh_every=config.refresh_every,
        damping=config.damping if config.damping > 0 else None,
        generator=generator,
    )


def run_student_teacher(
    config: TeacherConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: Progress = None,
) -> StudentTeacherResult:
    """Train the student on the teacher's states and record spectra and dynamics.

    Parameters
    ----------
    config : TeacherConfig
        ``optimizer``, ``lr``, ``num_steps`` and ``record_every`` select the run.
    generator : torch.Generator, optional
        Draws the problem, the eigensolver starts and the fixed-point seeds (default: seeded
        with ``config.seed``).
    progress : callable ``(done, total)``, optional
        Called after every training step.

    Returns
    -------
    StudentTeacherResult

    Notes
    -----
    Cost per record with the dense spectrum: ``P`` products with ``G`` (one block) and an
    ``eigh`` of ``P × P``; with Lanczos: one warm-started :func:`~lanczos_ntk.eigsh` plus SLQ.
    Fixed points are searched from the origin, the previous fixed points, the midpoints of
    pairs of them (where the saddle between two stable states lies) and the final states of
    the student's trials (Sussillo & Barak 2013).
    """
    config = config or TeacherConfig()
    gen = _generator(config, generator)
    prob = build_problem(config, gen)
    student, u, target = prob.student, prob.inputs, prob.targets
    names = tuple(n for n, p in student.named_parameters() if p.requires_grad)
    P = sum(p.numel() for p in student.parameters() if p.requires_grad)
    opt = _make_optimizer(config, student, u, config.optimizer, config.lr, gen)
    spectrum = _Spectrum(config, P, gen)
    n = config.state_size
    S, every = int(config.num_steps), int(config.record_every)

    losses: list[float] = []
    rec: dict[str, list] = {
        k: []
        for k in (
            "steps",
            "eig",
            "pr",
            "ent",
            "lead",
            "fpl",
            "nfp",
            "nst",
            "ccos",
            "dcos",
            "cval",
            "theta",
            "u1",
            "dval",
            "gg",
            "gd",
            "bcos",
            "bpr",
        )
    }
    trivial = torch.zeros(n, dtype=torch.float64)
    known = torch.zeros(0, n, dtype=torch.float64)
    t_train = t_rec = 0.0
    kind = student.kind
    # flat indices of the recurrent and input weights, and of the biases
    named = dict(student.named_parameters())
    spec = ParamSpec(names, tuple(named[k].shape for k in names))
    block, bias = spec.indices(("W", "B", "U")), spec.indices(("b",))
    shares: list[float] = []

    def lead_of(eigs):  # distance to the stability boundary: Re λ (flow), |μ| - 1 (map)
        return eigs.real if kind == "flow" else eigs.abs() - 1.0

    def record(step, states, loss):
        nonlocal trivial, known
        G = StateNTK(student, u).dual()
        lam, V, pr, ent, apply = spectrum(G)
        grads = torch.autograd.grad(
            loss, [dict(student.named_parameters())[k] for k in names], retain_graph=True
        )
        grad = torch.cat([t.reshape(-1) for t in grads]).detach().to(torch.float64)
        grad = grad / torch.linalg.vector_norm(grad).clamp_min(1e-300)
        pairs = torch.combinations(torch.arange(known.shape[0]), 2)
        mids = 0.5 * (known[pairs[:, 0]] + known[pairs[:, 1]]) if len(pairs) else known[:0]
        seeds = torch.cat(
            [trivial[None], torch.zeros(1, n, dtype=torch.float64), known, mids, states[:, -1].detach()]
        )  # midpoints: saddles between two nodes
        fp, i = _trivial_point(student, trivial, seeds, gen)
        rec["steps"].append(step)
        rec["eig"].append(lam.to(torch.float64))
        rec["pr"].append(pr)
        rec["ent"].append(ent)
        rec["nfp"].append(len(fp))
        rec["nst"].append(int(fp.stable.sum()) if len(fp) else 0)
        rec["fpl"].append(lead_of(fp.eigenvalues[:, 0]).clone() if len(fp) else torch.zeros(0))
        rec["theta"].append(_flat_params(student, names))
        u1 = V[:, 0].to(torch.float64)
        rec["u1"].append(u1)
        GB = None
        if spectrum.method == "dense" or block.numel() <= 512:
            E = torch.zeros(len(u1), block.numel(), dtype=torch.float64)
            E[block, torch.arange(block.numel())] = 1.0
            GB = E.T @ apply(E)
            GB = 0.5 * (GB + GB.T)
            lb = torch.linalg.eigvalsh(GB).clamp_min(0.0)
            rec["bpr"].append(float(lb.sum() ** 2 / (lb**2).sum()) if lb.sum() > 0 else math.nan)
        else:
            rec["bpr"].append(math.nan)
        if i is None:
            for k in ("lead", "ccos", "dcos", "cval", "dval", "gg", "gd", "bcos"):
                rec[k].append(float("nan"))
            return
        trivial, known = fp.points[i].detach(), fp.points.detach()
        rec["lead"].append(float(lead_of(fp.eigenvalues[i, 0])))
        try:
            Q, d, _ = _critical(student, trivial, names)
        except ValueError:
            for k in ("ccos", "dcos", "cval", "dval", "gg", "gd", "bcos"):
                rec[k].append(float("nan"))
            return
        dhat = d / torch.linalg.vector_norm(d).clamp_min(1e-300)
        rec["ccos"].append(float(torch.linalg.vector_norm(Q.T @ u1)))
        rec["dcos"].append(float((dhat @ u1).abs()))
        rec["cval"].append(float(torch.linalg.eigvalsh(Q.T @ apply(Q)).max()))
        rec["dval"].append(float(dhat @ apply(dhat[:, None])[:, 0]))
        rec["gg"].append(float(torch.linalg.vector_norm(Q.T @ grad)))
        rec["gd"].append(float((dhat @ grad).abs()))
        if GB is not None:
            ub = torch.linalg.eigh(GB).eigenvectors[:, -1]
            db = d[block]
            rec["bcos"].append(float((db @ ub).abs() / torch.linalg.vector_norm(db).clamp_min(1e-300)))
        else:
            rec["bcos"].append(math.nan)

    for step in range(S + 1):
        t0 = time.perf_counter()
        opt.zero_grad()
        states = student(u)
        loss = ((states - target) ** 2).mean()
        losses.append(float(loss.detach()))
        t1 = time.perf_counter()
        if step % every == 0 or step == S:
            record(step, states, loss)
        t2 = time.perf_counter()
        t_rec += t2 - t1
        if step == S:
            break
        before = _flat_params(student, names)
        loss.backward()
        opt.step()
        t_train += (t1 - t0) + (time.perf_counter() - t2)
        delta = _flat_params(student, names) - before
        shares.append(
            float(torch.linalg.vector_norm(delta[bias]) / torch.linalg.vector_norm(delta).clamp_min(1e-300))
        )
        if progress is not None:
            progress(step + 1, S)

    steps = torch.tensor(rec["steps"], dtype=torch.long)
    lead = torch.tensor(rec["lead"], dtype=torch.float64)
    nst = torch.tensor(rec["nst"], dtype=torch.long)
    crossing = detect_crossing(steps, torch.nan_to_num(lead, nan=-math.inf), nst)
    pr = torch.tensor(rec["pr"], dtype=torch.float64)
    collapse = collapse_steps(steps, pr)
    ref = (crossing.index - 1) if crossing.index is not None else len(steps) - 1
    top = crossing.index if crossing.index is not None else len(steps) - 1
    loss_t = torch.tensor(losses, dtype=torch.float64)
    start = int(math.ceil(crossing.step)) if crossing.step is not None else S
    after = loss_t[start:]
    fitted = torch.nonzero(loss_t < 1e-2 * loss_t[0]).reshape(-1)
    after_fit = loss_t[int(fitted[0]) :] if fitted.numel() else loss_t[:0]
    onsets = spike_onsets(loss_t, factor=config.spike_factor, start=start)
    status = Status.CONVERGED if crossing.step is not None else Status.PARTIAL
    message = (
        f"crossing at step {crossing.step:.2f}"
        if crossing.step is not None
        else "the student did not cross the bifurcation; train longer or raise lr"
    )
    k = spectrum.k
    eigs = torch.stack(
        [torch.nn.functional.pad(e, (0, k - e.numel()), value=float("nan")) for e in rec["eig"]]
    )
    num_matvecs = spectrum.num_matvecs + int(getattr(opt, "num_matvecs", 0))
    return StudentTeacherResult(
        config=config,
        optimizer=config.optimizer,
        lr=float(config.lr),
        loss=loss_t,
        steps=steps,
        eigenvalues=eigs,
        participation=pr,
        entropy=torch.tensor(rec["ent"], dtype=torch.float64),
        leading=lead,
        fixed_point_leading=tuple(rec["fpl"]),
        num_fixed_points=torch.tensor(rec["nfp"], dtype=torch.long),
        num_stable=nst,
        channel_cos=torch.tensor(rec["ccos"], dtype=torch.float64),
        sensitivity_cos=torch.tensor(rec["dcos"], dtype=torch.float64),
        channel_eigenvalue=torch.tensor(rec["cval"], dtype=torch.float64),
        crossing=crossing,
        collapse=collapse,
        theta_ref=rec["theta"][max(ref, 0)],
        top_vector_at_crossing=rec["u1"][top],
        param_names=names,
        spikes=len(onsets),
        spike_onsets=tuple(onsets),
        sensitivity_eigenvalue=torch.tensor(rec["dval"], dtype=torch.float64),
        gradient_channel_cos=torch.tensor(rec["gg"], dtype=torch.float64),
        gradient_sensitivity_cos=torch.tensor(rec["gd"], dtype=torch.float64),
        block_sensitivity_cos=torch.tensor(rec["bcos"], dtype=torch.float64),
        block_participation=torch.tensor(rec["bpr"], dtype=torch.float64),
        update_bias_share=torch.tensor(shares, dtype=torch.float64),
        max_loss_after_crossing=float(after.max()) if after.numel() else float("nan"),
        max_loss_after_fit=float(after_fit.max()) if after_fit.numel() else float("nan"),
        final_loss=float(loss_t[-1]),
        spectrum_method=spectrum.method,
        num_matvecs=num_matvecs,
        seconds_train=t_train,
        seconds_record=t_rec,
        seed=int(config.seed),
        status=status,
        message=message,
    )


# ----------------------------------------------------------------------------- landscape
def normal_form_response(model, cd, inputs: torch.Tensor, *, dt: float) -> tuple[float, float]:
    """``‖d‖² Σ_{b,t} (∂c_t/∂μ)²`` from the scalar normal form of the critical mode ``cd``, and
    the truncation's nonlinearity ``max_t (2|a₂ c_t| + 3|k₃| c_t²) / |μ|`` (the normal form is
    a small-amplitude expansion: where this is not ``≪ 1`` the comparison is qualitative).

    The critical coordinate follows ``c_{t+1} = c_t + s (μ c_t + a₂ c_t² + k₃ c_t³ + β_t)``
    (``s = dt``, ``μ = λ_c`` for a flow; ``s = 1``, ``μ = m - 1`` for a map) from
    ``c_0 = wᵀ(0 - x*)``, driven by ``β_t = wᵀ (∂f/∂u) u_t``; ``e_t = ∂c_t/∂μ`` obeys
    ``e_{t+1} = e_t + s (c_t + (μ + 2a₂c_t + 3k₃c_t²) e_t)``. A parameter step along ``d̂``
    moves ``μ`` by ``‖d‖``, and the states along ``v``.
    """
    x = cd.x.to(torch.float64)
    w = cd.w.real.to(torch.float64)
    params = {k: t.detach() for k, t in model.named_parameters()}
    u0 = torch.zeros(model.input_size, dtype=torch.float64)
    a2, k3 = real_mode_coefficients(model, cd, u0)
    fu = torch.func.jacrev(lambda uu: _rhs_with(model, params, x, uu))(u0)  # [n, d_in]
    beta = inputs.to(torch.float64) @ (fu.T @ w)  # [B, T]
    flow = cd.kind == "flow"
    s = float(dt) if flow else 1.0
    mu = float(cd.eigenvalue.real) - (0.0 if flow else 1.0)
    c = torch.full((beta.shape[0],), float(w @ (0.0 - x)), dtype=torch.float64)
    e = torch.zeros_like(c)
    total = nonlin = 0.0
    for t in range(beta.shape[1]):
        c, e = (
            c + s * (mu * c + a2 * c**2 + k3 * c**3 + beta[:, t]),
            e + s * (c + (mu + 2 * a2 * c + 3 * k3 * c**2) * e),
        )
        total += float((e**2).sum())
        nonlin = max(nonlin, float((2 * abs(a2) * c.abs() + 3 * abs(k3) * c**2).max()))
    return (
        float(torch.linalg.vector_norm(cd.d[:, 0])) ** 2 * total,
        nonlin / abs(mu) if mu != 0 else math.inf,
    )


def channel_landscape(
    config: TeacherConfig,
    theta: torch.Tensor,
    *,
    offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: Progress = None,
) -> ChannelLandscape:
    r"""``ĝᵀ G ĝ`` along the unfolding line ``θ(s) = θ_ref + s d̂`` through the pitchfork.

    ``d̂ = ∂λ_c/∂θ / ‖·‖`` at ``θ_ref`` (the trivial point's eigenvalue sensitivity), so
    ``λ_c(s) ≈ λ_c(θ_ref) + s ‖∂λ_c/∂θ‖``. By default the offsets put ``λ_c`` at
    ``-geomspace(mu_max, mu_min)`` (stable side) and a few positive values (unstable side).
    The probe trials are ``config.landscape_steps`` long (same pulses, then zero input).
    Cost per point: ``r`` JVPs for ``λ_bif`` plus the spectrum of ``G``.
    """
    gen = _generator(config, generator)
    prob = build_problem(config, gen)
    student = prob.student
    names = tuple(n for n, p in student.named_parameters() if p.requires_grad)
    theta = torch.as_tensor(theta, dtype=torch.float64)
    _load_flat(student, names, theta)
    n = config.state_size
    x0 = torch.zeros(n, dtype=torch.float64)
    fp, i = _trivial_point(student, x0, x0[None], gen)
    if i is None:
        raise RuntimeError("no trivial fixed point found at theta_ref")
    x = fp.points[i]
    _, d, cd0 = _critical(student, x, names)
    slope = float(torch.linalg.vector_norm(d))
    dhat = d / slope
    shift = 0.0 if student.kind == "flow" else 1.0  # λ_c - 0 (flow) or multiplier - 1 (map)
    rate = config.dt if student.kind == "flow" else 1.0
    mu0 = float(cd0.eigenvalue.real) - shift
    if offsets is None:
        npts = int(config.landscape_points)
        mus = torch.cat(
            [
                -torch.logspace(
                    math.log10(config.landscape_mu_max),
                    math.log10(config.landscape_mu_min),
                    npts,
                    dtype=torch.float64,
                ),
                torch.linspace(config.landscape_mu_min, 0.3, max(3, npts // 3), dtype=torch.float64),
            ]
        )
        offsets = (mus - mu0) / slope
    offsets = torch.as_tensor(offsets, dtype=torch.float64).reshape(-1)
    u = pulse_inputs(config.trials, config.landscape_steps, config.pulse_steps)
    spec = _Spectrum(config, theta.numel(), gen)
    spec.k = 1
    mu, lam_bif, lam_max, pred, lam_d, nform, nform_nl = [], [], [], [], [], [], []
    for j, s in enumerate(offsets.tolist()):
        _load_flat(student, names, theta + s * dhat)
        fp, i = _trivial_point(student, x, x[None], gen)
        xs = fp.points[i] if i is not None else x
        Q, ds, cd = _critical(student, xs, names)
        mu.append(float(cd.eigenvalue.real) - shift)
        K = StateNTK(student, u)
        JQ = K.engine.jvp(Q.to(K.engine.dtype)).to(torch.float64)
        lam_bif.append(float(torch.linalg.eigvalsh(JQ.T @ JQ).max()))
        Jd = K.engine.jvp((ds / torch.linalg.vector_norm(ds))[:, None].to(K.engine.dtype))
        lam_d.append(float((Jd.to(torch.float64) ** 2).sum()))
        nf_val, nf_nl = (
            normal_form_response(student, cd, u, dt=config.dt)
            if mu[-1] < 0 and cd.is_real
            else (float("nan"), float("nan"))
        )
        nform.append(nf_val)
        nform_nl.append(nf_nl)
        lam, *_ = spec(K.dual())
        lam_max.append(float(lam[0]))
        pred.append(
            predicted_channel_eigenvalue(cd, trials=config.trials, steps=config.landscape_steps, dt=config.dt)
            if mu[-1] < 0
            else float("nan")
        )
        if progress is not None:
            progress(j + 1, offsets.numel())
    mu_t = torch.tensor(mu, dtype=torch.float64)
    order = torch.argsort(offsets)
    s_sorted, mu_sorted = offsets[order], mu_t[order]
    s_c = float("nan")
    for a in range(1, len(order)):
        if float(mu_sorted[a - 1]) < 0 <= float(mu_sorted[a]):
            y0, y1 = float(mu_sorted[a - 1]), float(mu_sorted[a])
            s_c = float(s_sorted[a - 1] + (0 - y0) / (y1 - y0) * (s_sorted[a] - s_sorted[a - 1]))
            break
    if math.isnan(s_c):
        s_c = -mu0 / slope
    lb = torch.tensor(lam_bif, dtype=torch.float64)
    pr_t = torch.tensor(pred, dtype=torch.float64)
    mask = (mu_t < 0) & (mu_t.abs() * config.landscape_steps * rate >= config.landscape_fit_min)
    dist = (offsets - s_c).abs()
    ld = torch.tensor(lam_d, dtype=torch.float64)
    nf = torch.tensor(nform, dtype=torch.float64)
    exp = exp_se = pexp = ratio = exp_d = nf_exp = ratio_d = float("nan")
    if int(mask.sum()) >= 3:
        exp, exp_se = fit_power_law(dist[mask], lb[mask])
        pexp, _ = fit_power_law(dist[mask], pr_t[mask])
        ratio = float((lb[mask] / pr_t[mask]).median())
    both = mask & torch.isfinite(nf)  # the normal form needs the real pitchfork mode
    if int(both.sum()) >= 3:
        exp_d, _ = fit_power_law(dist[both], ld[both])
        nf_exp, _ = fit_power_law(dist[both], nf[both])
        ratio_d = float((ld[both] / nf[both]).median())
    return ChannelLandscape(
        s=offsets,
        mu=mu_t,
        s_c=s_c,
        slope=slope,
        lambda_bif=lb,
        lambda_max=torch.tensor(lam_max, dtype=torch.float64),
        predicted=pr_t,
        fit_mask=mask,
        exponent=exp,
        exponent_se=exp_se,
        predicted_exponent=pexp,
        ratio=ratio,
        trial_steps=int(config.landscape_steps),
        seed=int(config.seed),
        lambda_d=ld,
        normal_form=nf,
        exponent_d=exp_d,
        normal_form_exponent=nf_exp,
        ratio_d=ratio_d,
        normal_form_nonlinearity=torch.tensor(nform_nl, dtype=torch.float64),
    )


# ---------------------------------------------------------------------------- comparison
def compare_optimizers(
    config: TeacherConfig | None = None, *, generator_seed: int | None = None, progress: Progress = None
) -> OptimizerComparison:
    """Train SGD and LRNG from the same student at ``config.compare_lr`` for ``compare_steps``.

    Each run draws the problem from a fresh generator seeded with ``generator_seed`` (default
    ``config.seed``), so both start from identical parameters. ``progress`` counts the steps of
    both runs together.
    """
    config = config or TeacherConfig()
    seed = int(config.seed if generator_seed is None else generator_seed)
    total = 2 * int(config.compare_steps)
    runs = {}
    for j, name in enumerate(("sgd", "lrng")):
        cfg = dataclasses.replace(
            config,
            optimizer=name,
            lr=config.compare_lr,
            num_steps=config.compare_steps,
            record_every=config.compare_record_every,
        )
        gen = torch.Generator()
        gen.manual_seed(seed)
        offset = j * int(config.compare_steps)
        cb = None if progress is None else (lambda d, _t, o=offset: progress(o + d, total))
        runs[name] = run_student_teacher(cfg, generator=gen, progress=cb)
    per = {k: r.seconds_train / max(1, r.config.num_steps) for k, r in runs.items()}
    return OptimizerComparison(
        sgd=runs["sgd"],
        lrng=runs["lrng"],
        lr=float(config.compare_lr),
        seconds_per_step=per,
        overhead=per["lrng"] / per["sgd"],
    )


def run_experiment(
    config: TeacherConfig | None = None,
    *,
    progress: Progress = None,
    which: tuple[str, ...] = ("collapse", "landscape", "comparison"),
) -> TeacherExperiment:
    """The collapse run (``config.optimizer`` at ``config.lr``), the landscape through its
    crossing, and the optimizer comparison, with a summary of the numbers.

    ``progress(done, total)`` counts training steps and landscape points together.
    """
    config = config or TeacherConfig()
    n_land = int(config.landscape_points) + max(3, int(config.landscape_points) // 3)
    total = int(config.num_steps) + n_land + 2 * int(config.compare_steps)
    done = [0]

    def sub(offset):
        if progress is None:
            return None
        return lambda d, _t: progress(offset + d, total)

    gen = torch.Generator()
    gen.manual_seed(int(config.seed))
    collapse = run_student_teacher(config, generator=gen, progress=sub(0))
    done[0] = int(config.num_steps)
    gen = torch.Generator()
    gen.manual_seed(int(config.seed))
    landscape = channel_landscape(config, collapse.theta_ref, generator=gen, progress=sub(done[0]))
    done[0] += n_land
    comparison = compare_optimizers(config, progress=sub(done[0]))
    return TeacherExperiment(
        config=config,
        collapse=collapse,
        landscape=landscape,
        comparison=comparison,
        summary=summarize(collapse, landscape, comparison),
    )


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _direction_summary(r: StudentTeacherResult) -> dict:
    """Which direction training uses (d or g) before the crossing, and the (W, B) block."""
    if r.sensitivity_eigenvalue is None:
        return {}
    c = r.crossing
    last = (c.index - 1) if c.index is not None else len(r.steps) - 1
    upto = slice(0, max(last, 0) + 1)

    def med(t):
        t = t[upto]
        t = t[torch.isfinite(t)]
        return float(t.median()) if t.numel() else None

    return {
        "sensitivity_eigenvalue_initial": _finite(r.sensitivity_eigenvalue[0]),
        "sensitivity_eigenvalue_before_crossing": _finite(r.sensitivity_eigenvalue[last]),
        "channel_eigenvalue_before_crossing": _finite(r.channel_eigenvalue[last]),
        "gradient_channel_cos_median": med(r.gradient_channel_cos),
        "gradient_sensitivity_cos_median": med(r.gradient_sensitivity_cos),
        "block_sensitivity_cos_before_crossing": _finite(r.block_sensitivity_cos[last]),
        "block_participation_initial": _finite(r.block_participation[0]),
        "block_participation_before_crossing": _finite(r.block_participation[last]),
        "bias_share_median": (float(r.update_bias_share.median()) if r.update_bias_share.numel() else None),
    }


def spike_bias_share(r: StudentTeacherResult) -> float | None:
    """Median over spike onsets of the largest bias share (``‖Δb‖/‖Δθ‖``) of the three updates
    before each: near 1 when the spikes are the biases (None without spikes).
    """
    if r.update_bias_share is None or not r.spike_onsets:
        return None
    shares = r.update_bias_share
    vals = [float(shares[max(0, t - 3) : t].max()) for t in r.spike_onsets if t > 0]
    return float(torch.tensor(vals).median()) if vals else None


def summarize(
    collapse: StudentTeacherResult,
    landscape: ChannelLandscape | None = None,
    comparison: OptimizerComparison | None = None,
) -> dict:
    """The headline numbers as a flat dictionary of floats and ints."""
    c = collapse.crossing
    out = {
        "crossing_step": c.step,
        "stable_change_step": c.stable_change_step,
        "pr_initial": collapse.collapse["initial"],
        "pr_min": collapse.collapse["min_value"],
        "pr_min_step": collapse.collapse["min_step"],
        "pr_steepest_step": collapse.collapse["steepest_step"],
        "pr_half_step": collapse.collapse["half_step"],
        "entropy_initial": float(collapse.entropy[0]),
        "entropy_min": float(collapse.entropy.min()),
        "channel_cos_at_crossing": (float(collapse.channel_cos[c.index]) if c.index is not None else None),
        "sensitivity_cos_at_crossing": (
            float(collapse.sensitivity_cos[c.index]) if c.index is not None else None
        ),
        "collapse_final_loss": collapse.final_loss,
    }
    out.update(_direction_summary(collapse))
    if landscape is not None:
        out.update(
            {
                "landscape_exponent": landscape.exponent,
                "landscape_exponent_se": landscape.exponent_se,
                "landscape_predicted_exponent": landscape.predicted_exponent,
                "landscape_ratio_to_prediction": landscape.ratio,
                "landscape_exponent_d": landscape.exponent_d,
                "landscape_normal_form_exponent": landscape.normal_form_exponent,
                "landscape_ratio_d_to_normal_form": landscape.ratio_d,
            }
        )
    if comparison is not None:
        for name in ("sgd", "lrng"):
            r = getattr(comparison, name)
            out.update(
                {
                    f"{name}_final_loss": r.final_loss,
                    f"{name}_max_loss_after_crossing": r.max_loss_after_crossing,
                    f"{name}_max_loss_after_fit": r.max_loss_after_fit,
                    f"{name}_spikes": r.spikes,
                    f"{name}_spike_bias_share": spike_bias_share(r),
                    f"{name}_crossing_step": r.crossing.step,
                    f"{name}_recrossings": r.crossing.recrossings,
                    f"{name}_seconds_per_step": comparison.seconds_per_step[name],
                }
            )
        out["lrng_overhead"] = comparison.overhead
    return out


# ------------------------------------------------------------------------ seeds and models
@dataclasses.dataclass(frozen=True)
class SeedStudy(Result):
    """The experiment over several seeds and architectures (:func:`run_seeds`).

    ``rows``: one :func:`summarize` dictionary per run, with ``architecture`` and ``seed``
    (``error`` instead when a seed's problem could not be drawn). :meth:`spread` condenses them.
    """

    config: TeacherConfig
    rows: list

    def spread(self, keys: tuple[str, ...] | None = None) -> dict:
        """``{architecture: {key: {"mean", "std", "min", "max", "n"}}}`` over the seeds (numbers
        only; ``None`` entries, e.g. no crossing, are left out and ``n`` says how many counted).
        """
        out: dict = {}
        for row in self.rows:
            if "error" in row:
                continue
            arch = out.setdefault(row["architecture"], {})
            for k, v in row.items():
                if k in ("architecture", "seed") or (keys is not None and k not in keys):
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    arch.setdefault(k, []).append(float(v))
        for table in out.values():
            for k, vals in table.items():
                t = torch.tensor(vals, dtype=torch.float64)
                table[k] = {
                    "mean": float(t.mean()),
                    "std": float(t.std()) if t.numel() > 1 else 0.0,
                    "min": float(t.min()),
                    "max": float(t.max()),
                    "n": int(t.numel()),
                }
        return out


def run_seeds(
    config: TeacherConfig | None = None,
    *,
    seeds=(0, 1, 2, 3, 4),
    architectures=ARCHITECTURES,
    landscape: bool = True,
    compare: bool = True,
    progress: Progress = None,
    run=None,
) -> SeedStudy:
    """:func:`run_student_teacher` (and optionally the landscape and the optimizer comparison)
    for every architecture and seed, summarised per run.

    ``run(config, landscape, compare) -> dict`` replaces the default runner (for caching
    by the command line); ``progress(done, total)`` counts runs.
    """
    config = config or TeacherConfig()
    bad = [a for a in architectures if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"expected architectures from {ARCHITECTURES}, got {bad}")
    run = run or run_summary
    rows = []
    total = len(architectures) * len(seeds)
    for j, (arch, seed) in enumerate((a, s) for a in architectures for s in seeds):
        cfg = dataclasses.replace(config, architecture=arch, seed=int(seed))
        try:
            row = run(cfg, landscape, compare)
        except ValueError as exc:  # e.g. W0 without a positive real eigenvalue for this seed
            row = {"error": str(exc)}
        rows.append({"architecture": arch, "seed": int(seed), **row})
        if progress is not None:
            progress(j + 1, total)
    return SeedStudy(config=config, rows=rows)


@dataclasses.dataclass(frozen=True)
class StudyRow(Result):
    """One run of a :class:`SeedStudy` (a unit the command line saves and resumes)."""

    architecture: str
    seed: int
    summary: dict


def run_summary(cfg: TeacherConfig, landscape: bool = True, compare: bool = True) -> dict:
    """One run of the experiment (the collapse run, optionally the landscape through its
    crossing and the optimizer comparison) condensed by :func:`summarize`.
    """
    gen = torch.Generator()
    gen.manual_seed(int(cfg.seed))
    collapse = run_student_teacher(cfg, generator=gen)
    land = channel_landscape(cfg, collapse.theta_ref) if landscape else None
    comp = compare_optimizers(cfg) if compare else None
    return summarize(collapse, land, comp)


# ----------------------------------------------------------------------------- early warning
@dataclasses.dataclass(frozen=True)
class TrackedRun(Result):
    """The student trained by SGD with the kernel tracker on (:func:`run_tracked`).

    ``track``: the :class:`lanczos_ntk.track.TrainingTrack` (records, loss, the actual crossing,
    the first warning, lead time, estimate at the warning, overhead); ``control``: the teacher
    needs no bifurcation (its gain below the critical one), so any warning is a false alarm;
    ``lead_fraction``: the lead time over the run's steps.
    """

    track: Any
    architecture: str
    seed: int
    control: bool
    lead_fraction: float | None


def run_tracked(
    config: TeacherConfig | None = None,
    *,
    horizon: float = 10.0,
    every: int = 2,
    control: bool = False,
    control_gain: float = 0.8,
    progress: Progress = None,
) -> TrackedRun:
    """Train the student with SGD (``config.lr``, ``config.num_steps``) while a
    :class:`~lanczos_ntk.track.KernelTracker` watches the trivial fixed point at zero input.

    ``control=True`` replaces the teacher's gain by ``control_gain`` (below the critical gain
    1): the student can fit it without a bifurcation, and every warning is a false alarm.
    """
    config = config or TeacherConfig()
    if control:
        config = dataclasses.replace(config, teacher_gain=float(control_gain))
    gen = _generator(config, None)
    prob = build_problem(config, gen)
    run = train_tracked(
        prob.student,
        prob.inputs,
        prob.targets,
        lr=config.lr,
        num_steps=config.num_steps,
        every=every,
        horizon=horizon,
        generator=gen,
        progress=progress,
        k=min(int(config.top_k), 8),
    )
    lead = run.lead_time
    return TrackedRun(
        track=run,
        architecture=config.architecture,
        seed=int(config.seed),
        control=control,
        lead_fraction=None if lead is None else lead / run.num_steps,
    )
