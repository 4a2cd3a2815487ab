"""Cell-linearised Jacobian products for any model with a one-step cell.

With ``s_t = F(θ, s_{t-1}, u_t)`` (``s_{-1}`` the initial state) and outputs ``y_t = s_t[out]``,
the Jacobian of the outputs is a linear recurrence

    δs_t = A_t δs_{t-1} + C_t δθ,      A_t = ∂F/∂s,  C_t = ∂F/∂θ  at  (s_{t-1}, u_t),

so ``J x`` is the direct term ``C_t x`` for every trial and time at once (the VJP of a VJP
through one cached graph of the cell over ``b·T`` rows) followed by ``T`` state-Jacobian
products, and ``Jᵀ v`` is the adjoint recurrence ``λ_t = v_t + A_{t+1}ᵀ λ_{t+1}`` followed by
``Σ_t C_tᵀ λ_t`` (one batched VJP through the same graph). The trajectory is computed once per
chunk; a block of ``k`` vectors shares every pass (the ``k`` tangents are one batch dimension).
"""

from __future__ import annotations

import torch
from torch.func import jvp, vjp, vmap

from ._dual_graph import DualGraph

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

    def __init__(self, cell, spec, params, u, h0, materialize: bool = False):
        # the direct term's graph is built by the first product, so that a linearisation used
        # to size a chunk does not hold it
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
        self._direct_graph = None  # the direct term's graph, built by the first product
        self.A = None  # [T, b, S, S]: time-major, so each step's matrices are contiguous
        if materialize:
            S = self.shape[2]
            self.A = self._state_jacobians(self.prev.transpose(0, 1).reshape(T * b, S),
                                           u.transpose(0, 1).reshape(T * b, d)).reshape(T, b, S, S)

    def _state_jacobians(self, flat_s, flat_u, group_bytes: int = 64 << 20) -> torch.Tensor:
        """Every step's ``A_t = ∂F/∂s`` ``[b·T, S, S]``, row by row: the cell's graph over all
        rows is recorded once and ``S`` basis cotangents go back through it in batched reverse
        passes (as many per pass as keep one cotangent batch under ``group_bytes``), so that a
        product's recurrence is ``T`` batched small matrix products with no autodiff in the
        loop. (Reverse passes through one graph cost half of pushing ``S`` tangents forward
        through ``torch.func.jvp``.)"""
        N, S = flat_s.shape
        group = max(1, min(S, group_bytes // max(1, flat_s.numel() * flat_s.element_size())))
        A = flat_s.new_empty(N, S, S)
        eye = torch.eye(S, dtype=flat_s.dtype, device=flat_s.device)
        s = flat_s.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.cell(self.params, s, flat_u)
            for j in range(0, S, group):
                E = eye[j:j + group].unsqueeze(1).expand(-1, N, S)
                (rows,) = torch.autograd.grad(out, s, E, retain_graph=j + group < S,
                                              is_grads_batched=True)          # [g, N, S]
                A[:, j:j + group] = rows.transpose(0, 1)
        return A

    def direct(self) -> DualGraph:
        """The direct term ``C x`` (the cell over all ``b·T`` rows at fixed states) as one
        autograd graph: ``C x`` by the VJP of its VJP, ``Cᵀ λ`` by its VJP."""
        if self._direct_graph is None:
            self._direct_graph = DualGraph(self._direct, self.theta)
        return self._direct_graph

    # -- state Jacobian at step t, on rows [b, k, S] -------------------------------------------
    def _step(self, t):
        params, u_t = self.params, self.u[:, t]
        return lambda s: self.cell(params, s, u_t)

    def _a(self, t, D):
        """``A_t D`` for tangents ``D [b, k, S]``."""
        if self.A is not None:  # one batched row-times-matrix product
            return torch.bmm(D, self.A[t].transpose(1, 2))
        f, s = self._step(t), self.prev[:, t]
        return vmap(lambda d: jvp(f, (s,), (d,))[1], in_dims=1, out_dims=1)(D)

    def _at(self, t, L):
        """``A_tᵀ L`` for cotangents ``L [b, k, S]``."""
        if self.A is not None:
            return torch.bmm(L, self.A[t])
        _, back = vjp(self._step(t), self.prev[:, t])
        return vmap(lambda v: back(v)[0], in_dims=1, out_dims=1)(L)

    # -- products ---------------------------------------------------------------------------
    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``[k, P] -> [k, b, T, c]``."""
        b, T, S = self.shape
        C = self.direct().jvp(self.spec.unflatten(X))                   # [k, b·T, S]
        C = C.reshape(-1, b, T, S).permute(1, 2, 0, 3)                  # [b, T, k, S]
        out = self.cell.out
        d = C[:, 0]
        ys = [d[..., out]]
        for t in range(1, T):
            d = self._a(t, d) + C[:, t]
            ys.append(d[..., out])
        return torch.stack(ys, 1).permute(2, 0, 1, 3)

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, b, T, c] -> [k, P]``."""
        k = V.shape[0]
        b, T, S = self.shape
        out = self.cell.out
        Vt = V.permute(1, 2, 0, 3)                                      # [b, T, k, c]
        lams = V.new_zeros(b, T, k, S)
        lam = V.new_zeros(b, k, S)
        for t in range(T - 1, -1, -1):
            lam = lam.clone()
            lam[..., out] += Vt[:, t]
            lams[:, t] = lam
            if t > 0:
                lam = self._at(t, lam)
        grads = self.direct().vjp(lams.permute(2, 0, 1, 3).reshape(k, b * T, S))
        return self.spec.flatten(grads, batch_dims=1)
