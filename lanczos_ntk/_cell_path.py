"""Cell-linearised Jacobian products for any model with a one-step cell.

With ``s_t = F(θ, s_{t-1}, u_t)`` (``s_{-1}`` the initial state) and outputs ``y_t = s_t[out]``,
the Jacobian of the outputs is a linear recurrence

    δs_t = A_t δs_{t-1} + C_t δθ,      A_t = ∂F/∂s,  C_t = ∂F/∂θ  at  (s_{t-1}, u_t),

so ``J x`` is the direct term ``C_t x`` for every trial and time at once (one vmapped JVP of the
cell over ``b·T`` rows) followed by ``T`` state-Jacobian products, and ``Jᵀ v`` is the adjoint
recurrence ``λ_t = v_t + A_{t+1}ᵀ λ_{t+1}`` followed by ``Σ_t C_tᵀ λ_t`` (one vmapped VJP of the
cell over ``b·T`` rows, whose graph is cached). The trajectory is computed once per chunk; a
block of ``k`` vectors shares every pass (the ``k`` tangents are one batch dimension).
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

__all__ = ["CellLinearization"]


class CellLinearization:
    """The linearisation of a :class:`~lanczos_ntk._cells.Cell` along one chunk's trajectory.

    Parameters
    ----------
    cell : the model's cell
    spec : the engine's :class:`~lanczos_ntk._functional.ParamSpec` (differentiated names)
    params : all parameters and buffers by name (snapshot values)
    u : inputs ``[b, T, d]``; h0 : the model's initial state or None
    """

    def __init__(self, cell, spec, params, u, h0):
        self.cell, self.spec = cell, spec
        self.params = params
        b, T, d = u.shape
        with torch.no_grad():
            s0 = cell.initial(h0, b, u.dtype, u.device)
            states = cell.states(params, u, h0)
        self.prev = torch.cat([s0.unsqueeze(1), states[:, :-1]], 1)        # [b, T, S]
        self.u = u
        self.shape = (b, T, cell.state_size)
        flat_s = self.prev.reshape(b * T, -1)
        flat_u = u.reshape(b * T, d)
        theta = {n: params[n] for n in spec.names}
        self.theta = theta

        def direct(th):
            return cell({**params, **th}, flat_s, flat_u)

        self._direct = direct
        with torch.enable_grad():
            _, self._direct_vjp = vjp(direct, theta)

    # -- state Jacobian at step t ----------------------------------------------------------
    def _step(self, t):
        params, u_t = self.params, self.u[:, t]
        return lambda s: self.cell(params, s, u_t)

    def _a(self, t, D):
        """``A_t D`` for tangents ``D [k, b, S]``."""
        f, s = self._step(t), self.prev[:, t]
        return vmap(lambda d: jvp(f, (s,), (d,))[1])(D)

    def _at(self, t, L):
        """``A_tᵀ L`` for cotangents ``L [k, b, S]``."""
        _, back = vjp(self._step(t), self.prev[:, t])
        return vmap(back)(L)[0]

    # -- products ---------------------------------------------------------------------------
    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``[k, P] -> [k, b, T, c]``."""
        b, T, S = self.shape
        tang = self.spec.unflatten(X)
        theta = self.theta
        C = vmap(lambda t: jvp(self._direct, (theta,), (t,))[1])(tang).reshape(-1, b, T, S)
        out = self.cell.out
        d = C[:, :, 0]
        ys = [d[..., out]]
        for t in range(1, T):
            d = self._a(t, d) + C[:, :, t]
            ys.append(d[..., out])
        return torch.stack(ys, 2)

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, b, T, c] -> [k, P]``."""
        k = V.shape[0]
        b, T, S = self.shape
        out = self.cell.out
        lams = V.new_zeros(k, b, T, S)
        lam = V.new_zeros(k, b, S)
        for t in range(T - 1, -1, -1):
            lam = lam.clone()
            lam[..., out] += V[:, :, t]
            lams[:, :, t] = lam
            if t > 0:
                lam = self._at(t, lam)
        (grads,) = vmap(self._direct_vjp)(lams.reshape(k, b * T, S))
        return self.spec.flatten(grads, batch_dims=1)
