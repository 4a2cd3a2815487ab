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
            grads = torch.autograd.grad(
                self.out,
                list(self.p.values()),
                V[0] if k == 1 else V,
                retain_graph=True,
                is_grads_batched=k > 1,
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
                return torch.autograd.grad(grads, v0, [tangents[n][0] for n in names], retain_graph=True)[
                    0
                ].unsqueeze(0)
            return torch.autograd.grad(
                grads, v0, [tangents[n] for n in names], retain_graph=True, is_grads_batched=True
            )[0]

    def release_dual(self) -> None:
        """Drop the VJP's graph (kept otherwise for the next :meth:`jvp`)."""
        self._dual = None
