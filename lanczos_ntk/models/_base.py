"""Common interface of the state-space models."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RhsView", "StateSpaceModel", "check_inputs"]


def check_inputs(u: torch.Tensor, input_size: int | None, name: str = "inputs") -> None:
    """Raise a clear error unless ``u`` is a floating tensor ``[B, T, input_size]``.

    ``input_size=None`` accepts any number of features.
    """
    d = "d_in" if input_size is None else input_size
    if not isinstance(u, torch.Tensor):
        raise TypeError(f"expected {name} as a torch.Tensor [B, T, {d}], got {type(u).__name__}")
    if not torch.is_floating_point(u):
        raise TypeError(
            f"expected floating-point {name}, got dtype {u.dtype}; convert with .double() or .float()"
        )
    if u.dim() != 3:
        raise ValueError(f"expected {name} of shape [B, T, {d}] (rank 3), got shape {tuple(u.shape)}")
    if input_size is not None and u.shape[-1] != input_size:
        raise ValueError(
            f"expected {name} with {input_size} features in the last dimension, got shape {tuple(u.shape)}"
        )
    if u.shape[0] == 0 or u.shape[1] == 0:
        raise ValueError(f"expected at least one trial and one time step, got shape {tuple(u.shape)}")


def check_finite(u: torch.Tensor, name: str = "inputs") -> None:
    """Raise a clear error naming the first non-finite entry of ``u [B, T, d]``. Kept out of
    :func:`check_inputs`, which runs inside ``forward``: a data-dependent check there would
    break tracing (``torch.func.linearize``, ``vmap``) of the models.
    """
    bad = ~torch.isfinite(u)
    if bool(bad.any()):
        where = tuple(int(i) for i in torch.nonzero(bad)[0])
        raise ValueError(
            f"{name}[{where[0]}, {where[1]}, {where[2]}] (trial, step, feature) is "
            f"{float(u[where])}, and {int(bad.sum())} entries in all are not finite; "
            "the sNTK needs finite inputs"
        )


class StateSpaceModel(nn.Module):
    """Base of the built-in models: a one-step map iterated over time.

    Subclasses define :meth:`rhs`: the vector field ``f(h, u)`` of a flow (``kind = "flow"``,
    integrated by explicit Euler with step ``dt``) or the update ``F(h, u)`` of a map
    (``kind = "map"``). ``forward(u, h0)`` returns the states after each step, ``[B, T, n]``.

    Attributes
    ----------
    kind : {"flow", "map"}
    state_size : int
        ``n``, the number of state variables.
    input_size : int
        ``d_in``.
    readout : torch.nn.Linear or None
        Optional linear readout ``y = C h + c``.
    """

    kind: str = "map"
    dt: float = 1.0
    #: parameters renamed since 0.1.0 (old name -> new); state dicts saved before still load
    RENAMED: dict[str, str] = {}

    def __init__(self, state_size: int, input_size: int):
        super().__init__()
        if int(state_size) < 1 or int(input_size) < 0:
            raise ValueError(
                f"expected state_size >= 1 and input_size >= 0, got {state_size} and {input_size}"
            )
        self.state_size = int(state_size)
        self.input_size = int(input_size)
        self.readout: nn.Linear | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for old, new in self.RENAMED.items():  # a checkpoint written before the rename
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _make_readout(self, readout_size: int | None, generator: torch.Generator, dtype: torch.dtype) -> None:
        """Linear readout with PyTorch's default init ``U(±1/sqrt(n))``, drawn from ``generator``
        (called last by each model, so its other weights do not depend on the readout).
        """
        if readout_size is None:
            return
        self.readout = nn.utils.skip_init(nn.Linear, self.state_size, int(readout_size), dtype=dtype)
        bound = 1.0 / self.state_size**0.5
        with torch.no_grad():
            for t in (self.readout.weight, self.readout.bias):
                r = torch.rand(t.shape, generator=generator, dtype=torch.float64)
                t.copy_((2 * r - 1) * bound)

    def rhs(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Vector field (flow) or next state (map) at states ``h [..., n]``, inputs ``u [..., d_in]``."""
        raise NotImplementedError

    def step(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """One time step of the simulated dynamics: Euler for flows, the map itself for maps."""
        if self.kind == "flow":
            return h + self.dt * self.rhs(h, u)
        return self.rhs(h, u)

    def initial_state(self, batch: int, *, dtype=None, device=None) -> torch.Tensor:
        p = next(iter(self.parameters()), None)
        dtype = dtype or (p.dtype if p is not None else torch.get_default_dtype())
        device = device or (p.device if p is not None else None)
        return torch.zeros(batch, self.state_size, dtype=dtype, device=device)

    def forward(self, u: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
        check_inputs(u, self.input_size)
        B, T, _ = u.shape
        h = self.initial_state(B, dtype=u.dtype, device=u.device) if h0 is None else h0
        if h.shape != (B, self.state_size):
            raise ValueError(f"expected h0 of shape [{B}, {self.state_size}], got {tuple(h.shape)}")
        states = []
        for t in range(T):
            h = self.step(h, u[:, t])
            states.append(h)
        return torch.stack(states, dim=1)

    def read(self, states: torch.Tensor) -> torch.Tensor:
        """Apply the readout to states ``[..., n]``."""
        if self.readout is None:
            raise ValueError(f"{type(self).__name__} was built without a readout (pass readout_size=...)")
        return self.readout(states)


class RhsView(nn.Module):
    """A model seen through its one-step ``rhs``, so ``functional_call`` reaches ``rhs(h, u)``
    instead of ``forward`` (parameter names gain the prefix ``m.``).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.m = model

    def forward(self, h, u):
        return self.m.rhs(h, u)
