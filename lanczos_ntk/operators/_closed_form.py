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

__all__ = ["WeightActivityJacobian", "closed_form"]


class _Linearization:
    def __init__(self, owner, params, u, h0):
        self.owner, self.spec = owner, owner.spec
        roles = owner.roles
        m = owner.model
        W, U, b = params[roles["W"]], params[roles["U"]], params[roles["b"]]
        self.W = W
        self.u = u
        B, T, _ = u.shape
        h = torch.zeros(B, m.state_size, dtype=W.dtype, device=W.device) if h0 is None else h0
        acts, dacts, ds = [], [], []
        with torch.no_grad():
            for t in range(T):
                a, da = owner.activity(h)
                z = a @ W.T + u[:, t] @ U.T + b
                h, d = owner.update(h, z)
                acts.append(a)
                dacts.append(da)
                ds.append(d)
        self.a = torch.stack(acts, 1)  # [b, T, n]
        self.da = None if dacts[0] is None else torch.stack(dacts, 1)  # [b, T, n]
        self.d = torch.stack(ds, 1) if isinstance(ds[0], torch.Tensor) else ds[0]
        self.psi_h = owner.psi_h

    def _d(self, t):
        return self.d[:, t] if isinstance(self.d, torch.Tensor) else self.d

    def rows(self, sl: slice) -> _Linearization:
        """The same linearisation restricted to the trials ``sl`` (views, no copies)."""
        new = object.__new__(_Linearization)
        new.__dict__.update(self.__dict__)
        new.a, new.u = self.a[sl], self.u[sl]
        new.da = None if self.da is None else self.da[sl]
        new.d = self.d[sl] if isinstance(self.d, torch.Tensor) else self.d
        return new

    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``[k, P] -> [k, b, T, n]``."""
        tang = self.spec.unflatten(X)
        r = self.owner.roles
        k = X.shape[0]
        B, T, n = self.a.shape
        c = torch.zeros(k, B, T, n, dtype=X.dtype, device=X.device)
        if r["W"] in tang:
            c = c + torch.einsum("kij,btj->kbti", tang[r["W"]], self.a)
        if r["U"] in tang:
            c = c + torch.einsum("kij,btj->kbti", tang[r["U"]], self.u)
        if r["b"] in tang:
            c = c + tang[r["b"]][:, None, None, :]
        WT = self.W.T
        dh = torch.zeros(k, B, n, dtype=X.dtype, device=X.device)
        out = []
        for t in range(T):
            zt = c[:, :, t]
            if t > 0:
                inner = dh if self.da is None else dh * self.da[:, t]
                zt = zt + inner @ WT
            dh = self._d(t) * zt if self.psi_h == 0 else self.psi_h * dh + self._d(t) * zt
            out.append(dh)
        return torch.stack(out, 2)

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, b, T, n] -> [k, P]``."""
        k, B, T, n = V.shape
        W = self.W
        lam = torch.zeros(k, B, n, dtype=V.dtype, device=V.device)
        mus: list[torch.Tensor] = []  # mu_{T-1}, ..., mu_0
        for t in range(T - 1, -1, -1):
            lam = lam + V[:, :, t]  # cotangent on h_{t+1}
            mu = self._d(t) * lam  # cotangent on z_t
            mus.append(mu)
            back = mu @ W
            if self.da is not None:
                back = back * self.da[:, t]
            lam = back if self.psi_h == 0 else self.psi_h * lam + back
        mu = torch.stack(mus[::-1], 2)  # [k, b, T, n]
        r = self.owner.roles
        grads = {}
        for name in self.spec.names:
            if name == r["W"]:
                grads[name] = torch.einsum("kbti,btj->kij", mu, self.a)
            elif name == r["U"]:
                grads[name] = torch.einsum("kbti,btj->kij", mu, self.u)
            elif name == r["b"]:
                grads[name] = mu.sum(dim=(1, 2))
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
