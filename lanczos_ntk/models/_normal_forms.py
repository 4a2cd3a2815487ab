"""Normal forms of codimension-one bifurcations as tiny trainable models.

The bifurcation parameter ``mu`` is a trainable parameter; inputs enter additively through a
trainable ``U`` (``n × d_in``; ``B`` before 0.2). Each bifurcation happens at ``mu = 0`` at the state ``0``.
Conventions follow Kuznetsov, *Elements of Applied Bifurcation Theory* (3rd ed.), ch. 3–4:

Flows (explicit Euler with ``dt``):

=============== ========================================================= ================
form            vector field                                              at ``mu = 0``
=============== ========================================================= ================
saddle_node     ``μ - x²``                                                fold
transcritical   ``μ x - x²``                                              branch point
pitchfork       ``μ x - x³`` (supercritical)                              branch point
hopf            ``ẋ = μx - ωy - r²x, ẏ = ωx + μy - r²y`` (l₁ < 0)         Hopf, frequency ω
=============== ========================================================= ================

Maps:

=============== ========================================================= ================
saddle_node     ``x + μ - x²``                                            fold (multiplier 1)
transcritical   ``x + μ x - x²``                                          branch point
pitchfork       ``x + μ x - x³``                                          branch point
flip            ``-(1 + μ) x + x³``                                       flip (multiplier -1)
neimark_sacker  ``z ↦ e^{iθ} z (1 + μ - |z|²)`` on ``(x, y) = (Re z, Im z)``  Neimark–Sacker
=============== ========================================================= ================
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ._base import StateSpaceModel

__all__ = ["ContinuousNormalForm", "DiscreteNormalForm", "CONTINUOUS_FORMS", "DISCRETE_FORMS"]

CONTINUOUS_FORMS = ("saddle_node", "transcritical", "pitchfork", "hopf")
DISCRETE_FORMS = ("saddle_node", "transcritical", "pitchfork", "flip", "neimark_sacker")
_TWO_D = ("hopf", "neimark_sacker")


class _NormalForm(StateSpaceModel):
    _forms: tuple[str, ...] = ()
    RENAMED = {"B": "U"}

    def __init__(self, form: str, *, mu: float, input_size: int, dtype: torch.dtype):
        if form not in self._forms:
            raise ValueError(
                f"unknown {self.kind} normal form {form!r}; expected one of {', '.join(self._forms)}"
            )
        super().__init__(2 if form in _TWO_D else 1, input_size)
        self.form = form
        self.mu = nn.Parameter(torch.tensor(float(mu), dtype=dtype))
        eye = torch.eye(self.state_size, max(input_size, 1), dtype=dtype)[:, :input_size]
        self.U = nn.Parameter(eye.clone())

    def extra_repr(self) -> str:
        return f"form={self.form!r}, mu={self.mu.item():.4g}"


class ContinuousNormalForm(_NormalForm):
    """Normal form of a flow; see the module docstring for the vector fields."""

    kind = "flow"
    _forms = CONTINUOUS_FORMS

    def __init__(
        self,
        form: str,
        *,
        mu: float = -0.5,
        input_size: int = 1,
        omega: float = 1.0,
        dt: float = 0.05,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__(form, mu=mu, input_size=input_size, dtype=dtype)
        self.dt = float(dt)
        self.omega = float(omega)

    def rhs(self, h, u):
        mu, x = self.mu, h[..., :1]
        if self.form == "saddle_node":
            f = mu - x**2
        elif self.form == "transcritical":
            f = mu * x - x**2
        elif self.form == "pitchfork":
            f = mu * x - x**3
        else:
            xx, yy = h[..., :1], h[..., 1:2]
            r2 = xx**2 + yy**2
            f = torch.cat([mu * xx - self.omega * yy - r2 * xx, self.omega * xx + mu * yy - r2 * yy], dim=-1)
        return f + u @ self.U.T


class DiscreteNormalForm(_NormalForm):
    """Normal form of a map; see the module docstring for the maps."""

    kind = "map"
    _forms = DISCRETE_FORMS

    def __init__(
        self,
        form: str,
        *,
        mu: float = -0.5,
        input_size: int = 1,
        theta: float = 2 * math.pi / 7,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__(form, mu=mu, input_size=input_size, dtype=dtype)
        self.theta = float(theta)

    def rhs(self, h, u):
        mu, x = self.mu, h[..., :1]
        if self.form == "saddle_node":
            f = x + mu - x**2
        elif self.form == "transcritical":
            f = x + mu * x - x**2
        elif self.form == "pitchfork":
            f = x + mu * x - x**3
        elif self.form == "flip":
            f = -(1 + mu) * x + x**3
        else:
            xx, yy = h[..., :1], h[..., 1:2]
            scale = 1 + mu - (xx**2 + yy**2)
            c, s = math.cos(self.theta), math.sin(self.theta)
            f = torch.cat([scale * (c * xx - s * yy), scale * (s * xx + c * yy)], dim=-1)
        return f + u @ self.U.T
