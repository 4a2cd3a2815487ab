"""Functional form of a model: ``(params, inputs, h0) -> outputs [b, T, c]``.

Everything the operators need from a model goes through here: which parameters are trainable,
how to flatten them into one ``P``-vector, and how to call the model with substituted
parameters (``torch.func.functional_call``) so that the user's module is never mutated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["ModelFunction", "ParamSpec", "resolve_params"]

_TORCH_RNNS = (nn.RNN, nn.GRU, nn.LSTM)


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of the trainable parameters in the flat ``P``-vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def indices(self, names) -> torch.Tensor:
        """Positions in the flat ``P``-vector of the parameters ``names`` (in spec order)."""
        wanted, start, out = set(names), 0, []
        for n, size in zip(self.names, self.sizes):
            if n in wanted:
                out.append(torch.arange(start, start + size))
            start += size
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def flatten(self, tensors: dict[str, torch.Tensor], batch_dims: int = 0) -> torch.Tensor:
        """Concatenate ``{name: [*batch, *shape]}`` into ``[*batch, P]``."""
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.names]
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split ``[*batch, P]`` into ``{name: [*batch, *shape]}``."""
        batch = flat.shape[:-1]
        chunks = torch.split(flat, list(self.sizes), dim=-1)
        return {n: c.reshape(*batch, *s) for n, c, s in zip(self.names, chunks, self.shapes)}


def resolve_params(model: nn.Module, params: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The trainable parameters as ``{name: detached tensor}``, validated."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    named = dict(model.named_parameters())
    if params is None:
        chosen = [n for n, p in named.items() if p.requires_grad]
        if not chosen:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters "
                "(none with requires_grad=True); the sNTK would be zero"
            )
    else:
        if isinstance(params, str):
            params = [params]
        chosen = list(dict.fromkeys(params))
        unknown = [n for n in chosen if n not in named]
        if unknown:
            raise ValueError(f"unknown parameter name(s) {unknown}; expected names from {list(named)}")
        if not chosen:
            raise ValueError("expected at least one parameter name in params, got an empty list")
    return {n: named[n].detach() for n in chosen}


class ModelFunction:
    """``f(params, u, h0) -> outputs [b, T, c]`` for a module and an output choice.

    Parameters
    ----------
    model : nn.Module
        A model of :mod:`lanczos_ntk.models`, any module whose ``forward(u)`` (or
        ``forward(u, h0)``) returns states ``[B, T, n]``, or ``torch.nn.RNN`` / ``GRU`` / ``LSTM``
        with ``batch_first=True`` (the per-step hidden states of the last layer are the states).
    outputs : "states", "readout" or callable
        What the kernel is taken of: the states, the model's readout (``model.read`` or
        ``model.readout``), or ``outputs(states) -> [B, T, c]``.
    """

    def __init__(self, model: nn.Module, outputs: str | Callable = "states"):
        self.model = model
        if isinstance(model, _TORCH_RNNS) and not model.batch_first:
            raise ValueError(
                f"expected a batch-first {type(model).__name__} "
                "(construct it with batch_first=True), got batch_first=False"
            )
        if isinstance(outputs, str):
            if outputs not in ("states", "readout"):
                raise ValueError(f"expected outputs='states', 'readout' or a callable, got {outputs!r}")
            if outputs == "readout" and not (
                callable(getattr(model, "read", None))
                or isinstance(getattr(model, "readout", None), nn.Module)
            ):
                raise ValueError(
                    f"outputs='readout' needs a model with a readout; {type(model).__name__} has none"
                )
        elif not callable(outputs):
            raise TypeError(
                f"expected outputs to be 'states', 'readout' or a callable, got {type(outputs).__name__}"
            )
        self.outputs = outputs

    def states(self, u: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        out = self.model(u) if h0 is None else self.model(u, h0)
        return out[0] if isinstance(self.model, _TORCH_RNNS) else out  # torch RNNs: (states, h_n)

    def read(self, states: torch.Tensor) -> torch.Tensor:
        if self.outputs == "states":
            return states
        if self.outputs == "readout":
            read = getattr(self.model, "read", None)
            return read(states) if callable(read) else cast(nn.Module, self.model.readout)(states)
        assert not isinstance(self.outputs, str)  # __init__ accepts no other string
        return self.outputs(states)

    def __call__(
        self, params: dict[str, torch.Tensor], u: torch.Tensor, h0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Outputs with ``params`` substituted (other parameters and buffers as they are)."""
        prefixed = {"model." + k: v for k, v in params.items()}
        return functional_call(self._wrapper, prefixed, (u, h0))

    @property
    def _wrapper(self) -> nn.Module:
        w = self.__dict__.get("_w")
        if w is None:
            w = self.__dict__["_w"] = _Wrapper(self)
        return w


class _Wrapper(nn.Module):
    """Module view of a :class:`ModelFunction`, so ``functional_call`` reaches the readout too."""

    def __init__(self, fn: ModelFunction):
        super().__init__()
        self.model = fn.model
        object.__setattr__(self, "_fn", fn)

    def forward(self, u, h0):
        return self._fn.read(self._fn.states(u, h0))
