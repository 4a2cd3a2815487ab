r"""Student–teacher experiment: a student learns a pitchfork, and its sNTK collapses on the way.

**Setup.** A teacher CTRNN ``dh/dt = -h + W tanh(h) + U u + b`` with
``W_T = 2 W₀ / ℓ`` (``W₀ = σ N(0,1)/√n + m mᵀ``, ``‖m‖ = 1``, ``ℓ`` the leading real eigenvalue of
``W₀``) has an unstable origin and two stable states ``±x*``: the trivial fixed point went
through a pitchfork at gain factor 1. The student starts at ``W_S = 0.6 W₀ / ℓ`` (origin
stable, leading Jacobian eigenvalue ``λ_c = -1 + 0.6 = -0.4``), ``U = m``, ``b = 0``. Trials are
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

from ._detectors import collapse_steps, count_spikes, detect_crossing, spike_onsets
from ._landscape import channel_landscape, normal_form_response
from ._problem import Problem, build_problem
from ._results import (
    ARCHITECTURES,
    ChannelLandscape,
    Crossing,
    OptimizerComparison,
    StudentTeacherResult,
    TeacherConfig,
    TeacherExperiment,
)
from ._study import (
    SeedStudy,
    StudyRow,
    TrackedRun,
    compare_optimizers,
    run_experiment,
    run_seeds,
    run_summary,
    run_tracked,
    spike_bias_share,
    summarize,
)
from ._training import run_student_teacher

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

# saved results name this public path (lanczos_ntk.experiments.teacher:TeacherConfig), not the
# private module that defines them
for _cls in (
    ChannelLandscape,
    Crossing,
    OptimizerComparison,
    Problem,
    SeedStudy,
    StudentTeacherResult,
    StudyRow,
    TeacherConfig,
    TeacherExperiment,
    TrackedRun,
):
    _cls.__module__ = __name__
del _cls
