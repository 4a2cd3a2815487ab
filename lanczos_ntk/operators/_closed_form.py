"""Closed-form Jacobian products for weight–activity recurrences (the CTRNN and the RNN).

Both models have the form ``h_{t+1} = ψ(h_t, z_t)`` with pre-activation
``z_t = W a(h_t) + U u_t + b`` linear in the weights. Their state Jacobian is a linear
recurrence driven by the Kronecker-structured direct term (DESIGN §1):

    δz_t = W (a'(h_t) ⊙ δh_t) + δW a(h_t) + δU u_t + δb,     δh_{t+1} = ψ_h δh_t + d_t ⊙ δz_t,

so ``J x`` is one forward linear recurrence and ``Jᵀ v`` one reverse (adjoint) recurrence,
each a single ``[k·b, n] × [n, n]`` product per time step; the weight gradients are then one
batched contraction over all trials and times. No autograd graph is kept: the cached
trajectory (``a(h_t)``, ``a'(h_t)``, ``d_t``) is all that is stored.
"""

from __future__ import annotations

import torch

from ..models import CTRNN, DiscreteRNN
from ._scratch import Scratch, fresh, writable

__all__ = ["WeightActivityJacobian", "closed_form"]


class _Linearization:
    """The trajectory of one chunk, stored time-major (``[T, b, ·]``) so that every step of the
    recurrences reads and writes contiguous ``[b, k, n]`` slices in place: per step one matrix
    product and two fused elementwise operations, nothing stacked or concatenated.
    """

    scratch: Scratch | None = None  # work buffers lent by the engine

    def __init__(self, owner, params, u, h0):
        self.owner, self.spec = owner, owner.spec
        roles = owner.roles
        m = owner.model
        W, U, b = params[roles["W"]], params[roles["U"]], params[roles["b"]]
        self.W = W
        B, T, d_in = u.shape
        n = m.state_size
        h = torch.zeros(B, n, dtype=W.dtype, device=W.device) if h0 is None else h0
        # per step the columns ``[a(h_t), u_t, 1]``: the parameter part of every pre-activation
        # is then one matrix product, and every weight's gradient one product back
        self.src = torch.empty(T, B, n + d_in + 1, dtype=W.dtype, device=W.device)
        self.src[:, :, n : n + d_in] = u.transpose(0, 1)
        self.src[:, :, -1] = 1
        self.da: torch.Tensor | None = None
        self.d: torch.Tensor | float | None = None
        with torch.no_grad():
            for t in range(T):
                a, da = owner.activity(h)
                self.src[t, :, :n] = a
                z = a @ W.T + u[:, t] @ U.T + b
                h, d = owner.update(h, z)
                if da is not None:
                    if self.da is None:
                        self.da = torch.empty(T, B, n, dtype=W.dtype, device=W.device)
                    self.da[t] = da
                if isinstance(d, torch.Tensor):
                    if not isinstance(self.d, torch.Tensor):
                        self.d = torch.empty(T, B, n, dtype=W.dtype, device=W.device)
                    self.d[t] = d
                else:
                    self.d = float(d)
        self.psi_h = owner.psi_h
        # a'(h_t) and a state-dependent ∂ψ/∂z per step as [b, 1, n] views that broadcast over a
        # block (None where they are not tensors)
        self.da_t = None if self.da is None else self.da.unsqueeze(2).unbind(0)
        self.d_t = self.d.unsqueeze(2).unbind(0) if isinstance(self.d, torch.Tensor) else None
        if isinstance(self.d, torch.Tensor) and self.psi_h != 0:
            raise ValueError("the closed form takes a state-dependent ∂ψ/∂z only with ∂ψ/∂h = 0")
        self.sizes = (n, d_in)

    def _scale(self) -> float:
        """The scalar ``∂ψ/∂z`` folded into the weights (1 when it varies per state)."""
        return self.d if isinstance(self.d, float) else 1.0

    def jvp(self, X: torch.Tensor, reuse_out: bool = False) -> torch.Tensor:
        """``[k, P] -> [k, b, T, n]`` (a view of a time-major buffer; with ``reuse_out``, of a
        scratch buffer that the next product overwrites).
        """
        tang = self.spec.unflatten(X)
        r = self.owner.roles
        k = X.shape[0]
        n, d_in = self.sizes
        T, B, cols = self.src.shape
        # the parameter part, [T·b, cols] @ [cols, k·n]; a scalar ∂ψ/∂z folded in
        rows = []
        for role, width in (("W", n), ("U", d_in), ("b", 1)):
            t = tang.get(r[role])
            rows.append(
                X.new_zeros(width, k * n)
                if t is None
                else t.reshape(k, n, width).permute(2, 0, 1).reshape(width, k * n)
            )
        Y = fresh("closed.jvp", (T * B, k * n), X, self.scratch if reuse_out else None)
        torch.mm(self.src.reshape(T * B, cols), torch.cat(rows) * self._scale(), out=Y)
        WT = (self.W * self._scale()).T
        ys, flat = Y.view(T, B, k, n).unbind(0), Y.view(T, B * k, n).unbind(0)  # views per step
        da, d4 = self.da_t, self.d_t
        psi = self.psi_h
        if da is not None:
            tmp = fresh("closed.tmp", (B, k, n), X, self.scratch)  # a'(h) ⊙ δ
            tmp_flat = tmp.view(B * k, n)
        if d4 is not None:
            ys[0].mul_(d4[0])
        for t in range(1, T):
            if da is None:
                flat[t].addmm_(flat[t - 1], WT)
            else:
                torch.mul(ys[t - 1], da[t], out=tmp)
                flat[t].addmm_(tmp_flat, WT)
            if d4 is not None:
                ys[t].mul_(d4[t])
            if psi != 0:
                ys[t].add_(ys[t - 1], alpha=psi)
        return Y.view(T, B, k, n).permute(2, 1, 0, 3)

    def vjp(self, V: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``[k, b, T, n] -> [k, P]`` (with ``consume``, ``V`` may be overwritten: the
        recurrence then runs in place in a time-major ``V``, as :meth:`jvp` leaves it).
        """
        k, B, T, n = V.shape
        Vt = V.permute(2, 1, 0, 3)  # [T, b, k, n] (contiguous when V came from jvp)
        # L[t]: the cotangent on h_{t+1}, then (a state-dependent ∂ψ/∂z) on z_t; v time-major
        # in one copy (none for a consumed V), the recurrence adds into it in place
        L = writable(Vt, consume, "closed.vjp", self.scratch)
        Wd = self.W * self._scale()
        ls, flat = L.unbind(0), L.view(T, B * k, n).unbind(0)  # views per step
        da, d4 = self.da_t, self.d_t
        psi = self.psi_h
        if da is not None:
            back = fresh("closed.back", (B * k, n), V, self.scratch)  # λ Wd
            back3 = back.view(B, k, n)
        for t in range(T - 1, 0, -1):
            lam = ls[t]
            if d4 is not None:
                lam.mul_(d4[t])  # now the cotangent on z_t
            if psi != 0:
                ls[t - 1].add_(lam, alpha=psi)
            if da is None:
                flat[t - 1].addmm_(flat[t], Wd)
            else:
                torch.mm(flat[t], Wd, out=back)
                ls[t - 1].addcmul_(back3, da[t])
        if d4 is not None:
            ls[0].mul_(d4[0])
        cols = self.src.shape[-1]
        # [cols, T·B] x [T·B, k·n], transposed after: the few columns as the product's short
        # side (CTRNN, b=256, T=100, n=128, block of 10: 34 against 53 ms the other way round)
        full = (self.src.reshape(T * B, cols).T @ L.reshape(T * B, k * n)).T.view(k, n, cols)
        full = full * self._scale()
        r = self.owner.roles
        n_, d_in = self.sizes
        parts = {r["W"]: full[..., :n_], r["U"]: full[..., n_ : n_ + d_in], r["b"]: full[..., -1]}
        grads = {}
        for name in self.spec.names:
            if name in parts:
                grads[name] = parts[name]
            else:
                shape = self.spec.shapes[self.spec.names.index(name)]
                grads[name] = torch.zeros(k, *shape, dtype=V.dtype, device=V.device)
        return self.spec.flatten(grads, batch_dims=1)


class WeightActivityJacobian:
    """Structured Jacobian products of a model ``h' = ψ(h, W a(h) + U u + b)``.

    Parameters
    ----------
    model : the model (its ``state_size`` and weights are read)
    spec : the engine's :class:`~lanczos_ntk._functional.ParamSpec`
    roles : mapping of ``"W"``, ``"U"``, ``"b"`` to the model's parameter names
    activity : ``h -> (a(h), a'(h) or None for the identity)``
    update : ``(h, z) -> (h', d)`` with ``d = ∂ψ/∂z`` (a tensor or a scalar)
    psi_h : the scalar ``∂ψ/∂h`` (``1 - dt`` for the Euler CTRNN, ``0`` for the RNN)
    """

    def __init__(self, model, spec, roles, activity, update, psi_h: float):
        self.model, self.spec, self.roles = model, spec, roles
        self.activity, self.update, self.psi_h = activity, update, float(psi_h)

    def linearize(self, params, u, h0):
        """Cache the trajectory at ``params`` (all of the model's parameters, by name)."""
        return _Linearization(self, params, u, h0)


def _runs_own_dynamics(model, cls) -> bool:
    """Whether ``model`` runs ``cls``'s own dynamics (a subclass may change any of them)."""
    return all(
        getattr(type(model), name) is getattr(cls, name)
        for name in ("rhs", "step", "forward", "initial_state")
    )


def closed_form(model, spec) -> WeightActivityJacobian | None:
    """The closed-form products of an unmodified CTRNN or DiscreteRNN, else ``None``."""
    if isinstance(model, CTRNN) and _runs_own_dynamics(model, CTRNN):
        dt = model.dt

        def activity(h):
            a = torch.tanh(h)
            return a, 1 - a * a

        def update(h, z):
            return h + dt * (z - h), dt

        return WeightActivityJacobian(
            model, spec, {"W": "W", "U": "U", "b": "b"}, activity, update, psi_h=1 - dt
        )
    if isinstance(model, DiscreteRNN) and _runs_own_dynamics(model, DiscreteRNN):

        def update(h, z):
            hn = torch.tanh(z)
            return hn, 1 - hn * hn

        return WeightActivityJacobian(
            model, spec, {"W": "W", "U": "U", "b": "b"}, lambda h: (h, None), update, psi_h=0.0
        )
    return None
