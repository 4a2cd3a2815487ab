"""The student–teacher problem: teacher, student, pulse inputs and targets."""

from __future__ import annotations

import dataclasses
import math

import torch

from ...dynamics._critical import is_complex
from ...models import CTRNN, GRU, DiscreteRNN
from ._results import TeacherConfig


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
                model.U.copy_(m[:, None])
        return model

    teacher, student = make(config.teacher_gain), make(config.student_gain)
    for p in teacher.parameters():
        p.requires_grad_(False)
    inputs = pulse_inputs(config.trials, config.trial_steps, config.pulse_steps)
    with torch.no_grad():
        targets = teacher(inputs)
    return Problem(teacher, student, inputs, targets, m, W0)
