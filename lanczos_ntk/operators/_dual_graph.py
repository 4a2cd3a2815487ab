"""Products with the Jacobian of a function through one cached autograd graph.

For ``y = f(θ)`` recorded once with autograd, ``Jᵀ v`` is a backward pass through the retained
graph, and ``J x`` is the backward pass of that backward pass: ``Jᵀ v0`` is linear in ``v0``,
so its VJP along ``x`` is ``J x`` ("the VJP of a VJP"). Both run without re-evaluating ``f`` and
take a block of ``k`` vectors in one batched pass. On the CPU this is several times faster than
``torch.func.jvp`` (which re-runs ``f`` with tangents through functorch's layers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DualGraph"]


def _engine_grad() -> Callable[..., tuple] | None:
    """``grad(outputs, grad_outputs, inputs)`` straight through autograd's engine, or None.

    :func:`torch.autograd.grad` spends tens of microseconds per call in Python (argument
    normalisation, shape checks) before the engine runs; the cell path calls it twice per time
    step, on graphs of ``b`` rows, where that is a third of the product. The products here
    pass tensors of the right shapes by construction, so they call the engine directly. The
    entry point is not public API: it is checked once against :func:`torch.autograd.grad` and
    not used when it is missing, has another signature or disagrees.
    """
    engine = getattr(getattr(torch.autograd, "Variable", None), "_execution_engine", None)
    if engine is None or not hasattr(engine, "run_backward"):
        return None

    def grad(outputs: tuple, grad_outputs: tuple, inputs: tuple, create_graph: bool = False) -> tuple:
        return engine.run_backward(outputs, grad_outputs, True, create_graph, inputs, True, False)

    try:
        x = torch.arange(1.0, 4.0, dtype=torch.float64, requires_grad=True)
        y = torch.tanh(x) * x
        v = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        (want,) = torch.autograd.grad(y, x, v, retain_graph=True)
        (got,) = grad((y,), (v,), (x,))
        return grad if torch.equal(got, want) else None
    except Exception:  # another torch: the public path
        return None


_ENGINE_GRAD = _engine_grad()


def _grad(outputs: tuple, grad_outputs: tuple, inputs: tuple, create_graph: bool = False) -> tuple:
    """``torch.autograd.grad(..., retain_graph=True, allow_unused=True)``, through the engine
    directly when :func:`_engine_grad` found it usable.
    """
    if _ENGINE_GRAD is not None:
        return _ENGINE_GRAD(outputs, grad_outputs, inputs, create_graph)
    return torch.autograd.grad(
        outputs, inputs, grad_outputs, retain_graph=True, create_graph=create_graph, allow_unused=True
    )


class DualGraph:
    """``f``'s output and graph at ``theta`` (a dict of tensors), for batched ``J x`` / ``Jᵀ v``.

    The graph of the VJP (``create_graph``) is built by the first :meth:`jvp` only, so that an
    object used for ``Jᵀ v`` alone holds just the forward graph.
    """

    def __init__(self, fn: Callable[[dict], torch.Tensor], theta: dict[str, torch.Tensor]):
        self.p = {k: v.detach().clone().requires_grad_(True) for k, v in theta.items()}
        with torch.enable_grad():
            self.out = fn(self.p)
        self._dual: tuple[torch.Tensor, list[torch.Tensor], list[str]] | None = None
        self.linearized: Callable[..., Any] | None = (
            None  # optionally, a traced JVP of ``f`` set by the owner
        )

    def vjp(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Jᵀ V`` for ``V [k, *out.shape]``: ``{name: [k, *shape]}``."""
        k = V.shape[0]
        with torch.enable_grad():  # one vector: a plain pass (a batched one goes through vmap)
            if k == 1:
                grads = _grad((self.out,), (V[0],), tuple(self.p.values()))
            else:
                grads = torch.autograd.grad(
                    self.out,
                    list(self.p.values()),
                    V,
                    retain_graph=True,
                    is_grads_batched=True,
                    allow_unused=True,
                )
        return {
            n: (g.reshape(k, *self.p[n].shape) if g is not None else V.new_zeros(k, *self.p[n].shape))
            for n, g in zip(self.p, grads)
        }

    def jvp(self, tangents: dict[str, torch.Tensor]) -> torch.Tensor:
        """``J X`` for ``X = {name: [k, *shape]}``: ``[k, *out.shape]``."""
        with torch.enable_grad():
            if self._dual is None:
                v0 = torch.zeros_like(self.out, requires_grad=True)
                names = list(self.p)
                all_grads = torch.autograd.grad(
                    self.out, [self.p[n] for n in names], v0, create_graph=True, allow_unused=True
                )
                keep = [j for j, g in enumerate(all_grads) if g is not None and g.requires_grad]
                self._dual = (v0, [all_grads[j] for j in keep], [names[j] for j in keep])
            v0, grads, names = self._dual
            k = next(iter(tangents.values())).shape[0]
            if not grads:  # the output does not depend on the parameters
                return self.out.new_zeros(k, *self.out.shape)
            if k == 1:
                return _grad(tuple(grads), tuple(tangents[n][0] for n in names), (v0,))[0].unsqueeze(0)
            return torch.autograd.grad(
                grads, v0, [tangents[n] for n in names], retain_graph=True, is_grads_batched=True
            )[0]

    def release_dual(self) -> None:
        """Drop the VJP's graph (kept otherwise for the next :meth:`jvp`)."""
        self._dual = None
