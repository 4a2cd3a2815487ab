"""Parametrised dynamical systems ``f(x, p)`` and the adapter from the package's models.

A :class:`System` is a flow ``dx/dt = f(x, p)`` or a map ``x ↦ f(x, p)`` with state ``x [n]`` and
one scalar continuation parameter ``p``. Its *residual* ``G(x, p)`` vanishes exactly at the fixed
points: ``G = f`` for a flow and ``G = f - x`` for a map. All derivatives are taken by automatic
differentiation (``torch.func``), so ``f`` must be written with differentiable torch operations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacfwd, jacrev, jvp

from ..models._base import RhsView

__all__ = ["System", "as_system", "system_from_model"]

_KINDS = ("flow", "map")


class System:
    r"""A flow or map ``f(x, p)`` with state ``x [n]`` and a scalar parameter ``p``.

    Parameters
    ----------
    f : callable
        ``f(x, p) -> [n]`` for ``x [n]`` and a 0-d tensor ``p``; differentiable with ``torch.func``.
    n : int
        State dimension.
    kind : {"flow", "map"}
        ``dx/dt = f`` or ``x_{t+1} = f(x_t)``.
    p0 : float, optional
        Natural starting value of the parameter (used when a routine is not given ``p``).
    dtype : torch.dtype
        Working precision (float64 by default).
    params_at, f_params : callables, optional
        Set by :func:`system_from_model`: ``params_at(p)`` returns the model's (effective)
        parameters at ``p`` as a dict of tensors and ``f_params(x, p, params)`` evaluates ``f``
        with those parameters replaced, so sensitivities to every model parameter can be taken.
    dt : float, optional
        For a flow that is simulated by explicit Euler steps (the models' ``dt``): the
        trajectories, and so the kernel, follow the map ``x ↦ x + dt f(x)``, whose fixed points
        are the flow's with multipliers ``1 + dt λ``. The map can be unstable where the flow is
        stable (``|1 + dt λ| > 1`` with ``Re λ < 0``); fixed points and branches then report
        both (``euler_stable``).

    Examples
    --------
    >>> import torch
    >>> s = System(lambda x, p: p - x**2, n=1, kind="flow", p0=1.0)
    >>> s.residual(torch.tensor([1.0], dtype=torch.float64), 1.0)
    tensor([0.], dtype=torch.float64)
    """

    def __init__(
        self,
        f: Callable,
        n: int,
        kind: str = "flow",
        p0: float | None = None,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        params_at: Callable | None = None,
        f_params: Callable | None = None,
        name: str = "",
        dt: float | None = None,
    ):
        if kind not in _KINDS:
            raise ValueError(f"expected kind 'flow' or 'map', got {kind!r}")
        if dt is not None and (kind != "flow" or not float(dt) > 0):
            raise ValueError(
                f"dt is the Euler step of a flow: expected kind 'flow' and dt > 0, "
                f"got kind {kind!r} and dt={dt!r}"
            )
        if not callable(f):
            raise TypeError(f"expected a callable f(x, p), got {type(f).__name__}")
        if int(n) < 1:
            raise ValueError(f"expected a state dimension n >= 1, got {n}")
        if (params_at is None) != (f_params is None):
            raise ValueError("params_at and f_params must be given together")
        self.f = f
        self.n = int(n)
        self.kind = kind
        self.p0 = None if p0 is None else float(p0)
        self.dtype = dtype
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self._params_at = params_at
        self._f_params = f_params
        self.name = name
        self.dt = None if dt is None else float(dt)

    def __repr__(self) -> str:
        return f"System(kind={self.kind!r}, n={self.n}, p0={self.p0}, name={self.name!r})"

    # ------------------------------------------------------------------ evaluation
    def scalar(self, p) -> torch.Tensor:
        """``p`` as a 0-d tensor of the working dtype."""
        return torch.as_tensor(p, dtype=self.dtype, device=self.device).reshape(())

    def state(self, x) -> torch.Tensor:
        """``x`` as a ``[n]`` tensor of the working dtype; raise a clear error otherwise."""
        x = torch.as_tensor(x, dtype=self.dtype, device=self.device)
        if x.shape != (self.n,):
            raise ValueError(f"expected a state of shape [{self.n}], got {tuple(x.shape)}")
        return x

    def __call__(self, x: torch.Tensor, p) -> torch.Tensor:
        return self.f(x, self.scalar(p) if not isinstance(p, torch.Tensor) else p)

    def residual(self, x: torch.Tensor, p) -> torch.Tensor:
        """``G(x, p)``: ``f`` for a flow, ``f - x`` for a map (zero at fixed points)."""
        fx = self(x, p)
        return fx - x if self.kind == "map" else fx

    # ------------------------------------------------------------------ derivatives
    def jacobian(self, x: torch.Tensor, p) -> torch.Tensor:
        """``A = ∂f/∂x`` at ``(x, p)``, ``[n, n]`` (the map's own Jacobian for a map)."""
        p = self.scalar(p)
        return _jacobian(lambda xx: self.f(xx, p), x)

    def residual_jacobian(self, y: torch.Tensor) -> torch.Tensor:
        """``[G_x, G_p]`` at ``y = (x, p)``, shape ``[n, n + 1]``.

        ``G_x`` by forward mode over ``x`` with ``p`` held (so a parameter tensor scaled by ``p``
        is not batched over the ``n`` directions), ``G_p`` by one more ``jvp``.
        """
        x, p = y[:-1], y[-1]
        Gx = _jacobian(lambda xx: self.residual(xx, p), x)
        return torch.cat([Gx, self.df_dp(x, p)[:, None]], dim=1)

    def df_dp(self, x: torch.Tensor, p) -> torch.Tensor:
        """``∂f/∂p`` at ``(x, p)``, ``[n]``."""
        p = self.scalar(p)
        return jvp(lambda pp: self.f(x, pp), (p,), (torch.ones_like(p),))[1]

    # ------------------------------------------------------------------ model parameters
    @property
    def has_params(self) -> bool:
        """Whether the system was built from a model (sensitivities to its parameters exist)."""
        return self._params_at is not None

    def params_at(self, p) -> dict[str, torch.Tensor]:
        """The model's parameters in effect at ``p`` (detached copies); ``{}`` for a plain ``f``."""
        if self._params_at is None:
            return {}
        with torch.no_grad():
            return {k: v.detach().clone() for k, v in self._params_at(self.scalar(p)).items()}

    def f_params(self, x: torch.Tensor, p, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``f(x, p)`` evaluated with the model parameters replaced by ``params``."""
        if self._f_params is None:
            raise ValueError("this system was not built from a model; it has no parameters θ")
        return self._f_params(x, self.scalar(p), params)


def _jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """Dense Jacobian by forward mode, falling back to reverse mode where forward AD is missing."""
    try:
        return jacfwd(fn)(x)
    except (NotImplementedError, RuntimeError):
        return jacrev(fn)(x)


def system_from_model(
    model: nn.Module,
    param: str | Callable | None = None,
    u: torch.Tensor | None = None,
    *,
    p0: float | None = None,
) -> System:
    r"""Hold a model at a constant input and expose one scalar continuation parameter.

    The model is never mutated: ``f(x, p) = model.rhs(x, u(p))`` is evaluated with
    :func:`torch.func.functional_call` on a snapshot of the parameters taken now.

    Parameters
    ----------
    model : nn.Module
        A model of :mod:`lanczos_ntk.models`, or any module with ``kind``, ``rhs(h, u)``,
        ``state_size`` and ``input_size``.
    param : str or callable, optional
        The continuation parameter ``p``:

        - ``None``: no parameter (``p`` is ignored; for fixed-point searches);
        - ``"gain"``: the recurrent gain, ``W = p · W₀ / gain₀`` (``p0 = gain₀``);
        - ``"input"``: the input level, ``u(p) = p · u₀`` with ``u₀ = u`` (``p0 = 1``), or
          ``u₀ = 1`` when ``u`` is not given (``p0 = 0``);
        - the name of a parameter with one element (e.g. ``"mu"``): ``p`` is its value;
        - the name of a larger parameter: ``θ = p · θ₀`` (``p0 = 1``);
        - a callable ``param(p, params, u) -> (params, u)`` returning the parameter dict and
          input in effect at ``p`` (``p0`` must then be given).
    u : tensor ``[d_in]``, optional
        The constant input (zeros by default).
    p0 : float, optional
        Overrides the natural starting value of ``p``.

    Returns
    -------
    System
        With ``params_at(p)`` and ``f_params`` so sensitivities to every parameter of the model
        (named as in ``model.named_parameters()``) can be computed, and the model's Euler step
        ``dt`` for a flow that has one.
    """
    for attr in ("kind", "rhs", "state_size", "input_size"):
        if not hasattr(model, attr):
            raise TypeError(
                f"expected a model with kind, rhs, state_size and input_size; "
                f"{type(model).__name__} has no {attr!r}"
            )
    # the duck-typed attributes checked above (nn.Module types them as Tensor | Module)
    spec: Any = model
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    dtype = next(iter(base.values())).dtype if base else torch.float64
    device = next(iter(base.values())).device if base else torch.device("cpu")
    d_in = int(spec.input_size)
    if u is None:
        u_base = torch.zeros(d_in, dtype=dtype, device=device)
    else:
        u_base = torch.as_tensor(u, dtype=dtype, device=device).reshape(-1)
        if u_base.shape != (d_in,):
            raise ValueError(
                f"expected a constant input of shape [{d_in}], got {tuple(torch.as_tensor(u).shape)}"
            )
    wrapper = RhsView(model)

    def call(x, uu, params):
        return functional_call(wrapper, {"m." + k: v for k, v in params.items()}, (x, uu))

    if param is None:

        def setting(p):
            return base, u_base

        start = 0.0
    elif callable(param):
        if p0 is None:
            raise ValueError("a callable param needs the starting value p0")

        def setting(p):
            return param(p, dict(base), u_base)

        start = p0
    elif param == "input":
        direction = u_base if u is not None else torch.ones(d_in, dtype=dtype, device=device)

        def setting(p):
            return base, p * direction

        start = 1.0 if u is not None else 0.0
    elif param == "gain":
        gain0 = float(getattr(model, "gain", 0.0))
        if "W" not in base or gain0 == 0.0:
            raise ValueError(
                f"param='gain' needs a parameter 'W' and a nonzero attribute 'gain'; "
                f"{type(model).__name__} has gain={getattr(model, 'gain', None)}"
            )
        W0 = base["W"]

        def setting(p):
            return {**base, "W": p * W0 / gain0}, u_base

        start = gain0
    elif isinstance(param, str) and param in base:
        theta0 = base[param]
        if theta0.numel() == 1:

            def setting(p):
                return {**base, param: p.reshape(theta0.shape).to(theta0.dtype)}, u_base

            start = float(theta0.item())
        else:

            def setting(p):
                return {**base, param: p * theta0}, u_base

            start = 1.0
    else:
        raise ValueError(
            f"unknown continuation parameter {param!r}; expected None, 'gain', 'input', "
            f"a callable or one of {sorted(base)}"
        )

    def f(x, p):
        params, uu = setting(p)
        return call(x, uu, params)

    def f_params(x, p, params):
        return call(x, setting(p)[1], params)

    label = param if isinstance(param, str) or param is None else "callable"
    dt = getattr(model, "dt", None) if spec.kind == "flow" else None
    return System(
        f,
        spec.state_size,
        spec.kind,
        start if p0 is None else p0,
        dtype=dtype,
        device=device,
        params_at=lambda p: setting(p)[0],
        f_params=f_params,
        name=f"{type(model).__name__}[{label}]",
        dt=float(dt) if isinstance(dt, (int, float)) and dt > 0 else None,
    )


def as_system(
    obj,
    *,
    kind: str | None = None,
    n: int | None = None,
    p0: float | None = None,
    param: str | Callable | None = None,
    u: torch.Tensor | None = None,
) -> System:
    """Accept a :class:`System`, a model (via :func:`system_from_model`) or a callable ``f(x, p)``."""
    if isinstance(obj, System):
        return obj
    if hasattr(obj, "rhs") and hasattr(obj, "kind"):
        return system_from_model(obj, param, u, p0=p0)
    if callable(obj):
        if n is None:
            raise ValueError("a plain callable f(x, p) needs the state dimension (pass x0 or n)")
        return System(obj, n, kind or "flow", p0)
    raise TypeError(f"expected a System, a model or a callable f(x, p), got {type(obj).__name__}")
