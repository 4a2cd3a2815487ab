r"""Finite-``T`` amplification landscapes of the normal forms: ``‖D_μ h‖`` over ``(μ, α₀)``.

For a normal form with unfolding parameter ``μ`` (:mod:`lanczos_ntk.models`, bifurcation at
``μ = 0``, state ``0``) and a trial that starts at ``h_0 = α₀`` (``(α₀, 0)`` for the planar
forms) under zero input, the **amplification** is

.. math::  A_T(μ, α₀) = ‖∂ h_{1:T} / ∂μ‖ = \Big(Σ_{t=1}^{T} ‖∂h_t/∂μ‖²\Big)^{1/2},

the square root of the one-trial sNTK restricted to ``μ`` (the paper's unfolding direction). Its
two regimes are the transient law of :mod:`lanczos_ntk.channels`:

- near the fixed point (``α₀ → 0`` on a branch through the origin) ``∂h_t/∂μ ≈ α₀ t m^{t-1}``,
  so ``A_T² ≈ α₀² Σ t² m^{2(t-1)}``: zero at ``α₀ = 0``, growing like ``δ⁻³`` once ``T δ ≫ 1``
  and like ``T³`` when ``T δ ≪ 1`` (finite ``T`` caps the divergence);
- at a fold (``μ - x²``) the state is driven by ``μ`` itself and ``A_T`` is large even at
  ``α₀ = 0``.

At ``T = 5`` every form is smooth in ``μ`` (nothing has time to diverge); at ``T = 25`` the ridge
along ``μ = 0`` appears. :func:`normal_form_landscape` computes a grid with one forward-mode
product per ``μ`` (all ``α₀`` as trials).
"""

from __future__ import annotations

import dataclasses

import torch
from torch.func import functional_call, jvp

from ._results import Result
from .models import CONTINUOUS_FORMS, DISCRETE_FORMS, ContinuousNormalForm, DiscreteNormalForm

__all__ = ["NormalFormLandscape", "normal_form_landscape"]


@dataclasses.dataclass(frozen=True)
class NormalFormLandscape(Result):
    """``amplification[i, j, k] = A_{T_i}(μ_j, α₀_k)`` for one normal form.

    ``form``, ``kind`` (``"flow"`` or ``"map"``), ``dt`` (flows), ``steps`` ``[S]``, ``mu``
    ``[N]``, ``alpha`` ``[A]``; ``diverged`` ``[S, N, A]`` marks trials whose states left
    ``|h| <= escape`` within ``T`` steps (they run off to infinity: outside the normal form's
    local range; their amplification is NaN).
    """

    form: str
    kind: str
    dt: float
    steps: torch.Tensor
    mu: torch.Tensor
    alpha: torch.Tensor
    amplification: torch.Tensor
    diverged: torch.Tensor
    escape: float = 10.0


def normal_form_landscape(
    form: str,
    *,
    kind: str = "map",
    mu=None,
    alpha=None,
    steps=(5, 25),
    dt: float = 0.05,
    escape: float = 10.0,
) -> NormalFormLandscape:
    """``‖∂h_{1:T}/∂μ‖`` over a ``(μ, α₀)`` grid for one normal form and each ``T`` in ``steps``.

    Parameters
    ----------
    form : str
        A form of :class:`~lanczos_ntk.models.DiscreteNormalForm` (``kind="map"``:
        saddle_node, transcritical, pitchfork, flip, neimark_sacker) or
        :class:`~lanczos_ntk.models.ContinuousNormalForm` (``"flow"``, Euler step ``dt``:
        saddle_node, transcritical, pitchfork, hopf).
    mu, alpha : sequences of float, optional
        The grid (default 81 values of ``μ`` in ``[-0.5, 0.5]``, 61 of ``α₀`` in ``[-1, 1]``).
    steps : sequence of int
        Trial lengths ``T`` (one trajectory of ``max(steps)`` serves all).
    escape : float
        A trial whose state leaves ``|h| <= escape`` is escaping to infinity (the forms with a
        quadratic term do from one side): its amplification is NaN and ``diverged`` is set.

    Note: the pitchfork, flip and Neimark–Sacker maps give the same landscape (the flip map
    is minus the pitchfork map, and the Neimark–Sacker modulus follows the pitchfork map),
    so their norms agree trial by trial.
    """
    if kind not in ("map", "flow"):
        raise ValueError(f"expected kind 'map' or 'flow', got {kind!r}")
    forms = DISCRETE_FORMS if kind == "map" else CONTINUOUS_FORMS
    if form not in forms:
        raise ValueError(f"unknown {kind} normal form {form!r}; expected one of {', '.join(forms)}")
    mu = (
        torch.linspace(-0.5, 0.5, 81, dtype=torch.float64)
        if mu is None
        else torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    )
    alpha = (
        torch.linspace(-1.0, 1.0, 61, dtype=torch.float64)
        if alpha is None
        else torch.as_tensor(alpha, dtype=torch.float64).reshape(-1)
    )
    steps_t = torch.as_tensor(list(steps), dtype=torch.long).reshape(-1)
    if steps_t.numel() == 0 or int(steps_t.min()) < 1:
        raise ValueError(f"expected trial lengths >= 1, got {list(steps)}")
    if mu.numel() == 0 or alpha.numel() == 0:
        raise ValueError("expected a non-empty grid of mu and alpha")
    T = int(steps_t.max())
    model = DiscreteNormalForm(form, mu=0.0) if kind == "map" else ContinuousNormalForm(form, mu=0.0, dt=dt)
    n = model.state_size
    h0 = torch.zeros(alpha.numel(), n, dtype=torch.float64)
    h0[:, 0] = alpha
    u = torch.zeros(alpha.numel(), T, model.input_size, dtype=torch.float64)
    fixed = {k: v.detach() for k, v in model.named_parameters() if k != "mu"}

    def states(m):
        return functional_call(model, {**fixed, "mu": m}, (u, h0))

    amp = torch.full((steps_t.numel(), mu.numel(), alpha.numel()), float("nan"), dtype=torch.float64)
    bad = torch.zeros(amp.shape, dtype=torch.bool)
    for j, m in enumerate(mu.tolist()):
        with torch.no_grad():
            h, dh = jvp(  # type: ignore[misc]  # torch.func.jvp lacks has_aux overloads: 2- or 3-tuple
                states, (torch.tensor(m, dtype=torch.float64),), (torch.tensor(1.0, dtype=torch.float64),)
            )
        sq = (dh**2).sum(dim=2)  # [A, T]
        big = ~torch.isfinite(h).all(dim=2) | (h.abs() > escape).any(dim=2)  # [A, T]
        for i, t in enumerate(steps_t.tolist()):
            gone = big[:, :t].any(dim=1)
            amp[i, j] = torch.where(
                gone, torch.tensor(float("nan"), dtype=torch.float64), sq[:, :t].sum(dim=1).sqrt()
            )
            bad[i, j] = gone
    return NormalFormLandscape(
        form=form,
        kind=kind,
        dt=float(dt) if kind == "flow" else 1.0,
        steps=steps_t,
        mu=mu,
        alpha=alpha,
        amplification=amp,
        diverged=bad,
        escape=float(escape),
    )
