"""Cell-linearised Jacobian products for any model with a one-step cell.

With ``s_t = F(θ, s_{t-1}, u_t)`` (``s_{-1}`` the initial state) and outputs ``y_t = s_t[out]``,
the Jacobian of the outputs is a linear recurrence

    δs_t = A_t δs_{t-1} + C_t δθ,      A_t = ∂F/∂s,  C_t = ∂F/∂θ  at  (s_{t-1}, u_t),

so ``J x`` is the direct term ``C_t x`` for every trial and time at once (the VJP of a VJP
through one recorded graph of the cell over all ``b·T`` rows) followed by ``T`` products with
``A_t``, and ``Jᵀ v`` is the adjoint recurrence ``λ_t = v_t + A_{t+1}ᵀ λ_{t+1}`` followed by
``Σ_t C_tᵀ λ_t`` (one batched VJP through the same graph).

The products with ``A_t`` run the cell's state Jacobian traced once into straight-line code
(:mod:`lanczos_ntk.operators._traced_step`), with what it needs at each step evaluated once
along the trajectory. Cells that cannot be traced go through the cell's graph at step ``t``
(``b`` rows, recorded once with the trajectory): ``A_tᵀ λ`` is its VJP and ``A_t δ`` the VJP
of that VJP. Either way a step
costs a few small operations on ``[b, S]`` tensors and reads nothing of size ``b·S²`` (storing
every ``A_t`` instead costs ``S`` passes over all rows to build and ``b·S²`` numbers read per
step, which loses at every size measured). A block of ``k`` vectors shares the recurrences'
passes: its buffers are time-major ``[T, b, k, S]``, so a step is one ``[b·k, S]`` block of rows
(one matrix product), and the whole buffer is the direct term's layout, the ``k`` vectors of a
row side by side (``[T·b, k, S]``, :mod:`lanczos_ntk.operators._block_direct`): the direct term
runs once for the block in place, or vector by vector where that form is refused.

Running the cell over all ``b·T`` rows at once assumes that it treats every row alone. A cell
that reduces over its rows or branches on their values (``if h.sum() > 0``) gives something
else there than step by step: that is checked once per linearisation on the values (one more
evaluation of the cell over all rows), and such a cell's direct term goes step by step through
``T`` graphs of ``b`` rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._dual_graph import DualGraph
from ._scratch import Scratch, fresh, writable
from ._traced_step import DirectTrace, StepTrace, same_to_rounding

__all__ = ["CellLinearization"]


class CellLinearization:
    """The linearisation of a :class:`~lanczos_ntk.operators._cells.Cell` along one chunk's trajectory.

    Parameters
    ----------
    cell : the model's cell
    spec : the engine's :class:`~lanczos_ntk.operators._functional.ParamSpec` (differentiated names)
    params : all parameters and buffers by name (snapshot values)
    u : inputs ``[b, T, d]``; h0 : the model's initial state or None
    """

    scratch: Scratch | None = None  # work buffers lent by the engine

    def __init__(self, cell, spec, params, u, h0):
        # the graphs are recorded by the first product, so that a linearisation used to size a
        # chunk holds only the trajectory
        self.cell, self.spec = cell, spec
        self.params = params
        b, T, d = u.shape
        with torch.no_grad():
            s0 = cell.initial(h0, b, u.dtype, u.device)
            states = cell.states(params, u, h0)
        # time-major ([T, b, ·]), so that every step of the recurrences works on contiguous
        # slices: the state each step starts from, and its input
        self.prev = torch.cat([s0.unsqueeze(0), states.transpose(0, 1)[:-1]], 0)  # [T, b, S]
        self.u = u.transpose(0, 1).contiguous()
        self.shape = (b, T, cell.state_size)
        self._whole = cell.out.indices(cell.state_size) == (0, cell.state_size, 1)  # outputs = state
        flat_s = self.prev.reshape(T * b, -1)
        flat_u = self.u.reshape(T * b, d)
        self.theta = {n: params[n] for n in spec.names}

        def direct(th):
            return cell({**params, **th}, flat_s, flat_u)

        # the direct term takes the cell over all b·T rows at once; a cell that reduces over its
        # rows or branches on their values (``if h.sum() > 0``) gives something else there than
        # step by step, and then goes step by step (checked on the values, once)
        with torch.no_grad():
            try:
                whole = direct({})
            except (RuntimeError, TypeError, ValueError, IndexError):
                whole = None
        want = states.transpose(0, 1).reshape(T * b, -1)
        self.rows_apart = (
            isinstance(whole, torch.Tensor)
            and whole.shape == want.shape
            and same_to_rounding(whole, want, 1.0)
        )
        self._direct = direct
        self._direct_graph = None
        self._direct_steps: list[DualGraph] | None = None
        self._direct_traced: DirectTrace | None | bool = False  # False: not tried yet
        self._steps: list[DualGraph] | None = None
        self._traced: tuple[StepTrace, list[tuple]] | None = None
        self._shaped: list[tuple] | None = None  # every step's residuals for the row forms of blocks
        self._tried = False  # whether the trace was attempted (None then: untraceable)

    def direct(self) -> DualGraph:
        """The direct term ``C x`` (the cell over all ``b·T`` rows at fixed states) as one
        autograd graph: ``C x`` by the VJP of its VJP, ``Cᵀ λ`` by its VJP.
        """
        if self._direct_graph is None:
            self._direct_graph = DualGraph(self._direct, self.theta)
        return self._direct_graph

    def direct_steps(self) -> list[DualGraph]:
        """The direct term step by step (the cell at step ``t`` over its ``b`` rows as a
        function of the parameters), for a cell whose rows are not apart (:attr:`rows_apart`).
        """
        if self._direct_steps is None:
            cell, params, prev, u = self.cell, self.params, self.prev, self.u

            def at(t):
                return DualGraph(lambda th: cell({**params, **th}, prev[t], u[t]), self.theta)

            self._direct_steps = [at(t) for t in range(self.shape[1])]
        return self._direct_steps

    def _graph_jvp(self, tang: dict, k: int) -> torch.Tensor:
        """``C X`` through autograd's graphs, ``[T, b, k, S]`` (a view)."""
        b, T, S = self.shape
        if self.rows_apart:  # a broadcast tangent (an additive bias) comes back as an expand view
            return self.direct().jvp(tang).reshape(k, T, b, S).permute(1, 2, 0, 3)
        return torch.stack([g.jvp(tang) for g in self.direct_steps()]).transpose(1, 2)

    def _graph_vjp(self, lams: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Cᵀ Λ`` through autograd's graphs for ``Λ [T, b, k, S]``: ``{name: [k, ...]}``."""
        b, T, k, S = lams.shape
        if self.rows_apart:
            return self.direct().vjp(lams.view(T * b, k, S).transpose(0, 1).reshape(k, T * b, S))
        grads: dict[str, torch.Tensor] = {}
        for t, g in enumerate(self.direct_steps()):
            for n, v in g.vjp(lams[t].transpose(0, 1)).items():
                grads[n] = grads[n] + v if n in grads else v
        return grads

    def traced_direct(self) -> DirectTrace | None:
        """The direct term traced into straight-line code over all ``b·T`` rows (single
        vectors), or None (then :meth:`direct`'s graph serves them too, or where the rows are
        not apart, :meth:`direct_steps`).
        """
        if not self.rows_apart:
            return None
        if self._direct_traced is False:
            b, T, S = self.shape
            names = list(self.params)
            values = [self.params[n] for n in names]
            flat_s, flat_u = self.prev.reshape(T * b, S), self.u.reshape(T * b, -1)
            found = self.cell.direct_trace(names, values, list(self.theta), flat_s, flat_u)
            if found is None and not self.cell.direct_traced(names, list(self.theta), flat_s, flat_u):
                return None  # not traced yet: asked again at the next product
            self._direct_traced = found
            if found is not None:
                self._direct_graph = None  # the traced form serves single vectors and blocks
        return self._direct_traced if isinstance(self._direct_traced, DirectTrace) else None

    def steps(self) -> list[DualGraph]:
        """The cell's graph at every step ``t >= 1`` as a function of the state (index ``t``;
        step 0 starts from the fixed initial state and needs none).
        """
        if self._steps is None:
            cell, params, u = self.cell, self.params, self.u

            def step(t):
                return DualGraph(lambda th: cell(params, th["s"], u[t]), {"s": self.prev[t]})

            self._steps = [None] + [step(t) for t in range(1, self.shape[1])]
        return self._steps

    def _traced_products(self, k: int) -> tuple[Callable, Callable, list[tuple]] | None:
        """``(Aᵀ λ, A δ, residuals per step)`` on the traced path for ``k`` vectors (``[b, S]``,
        or ``[b, k, S]`` for a block), each ``f(res, x, acc, out)`` writing ``acc + A x`` into
        ``out``, or None.
        """
        traced = self.traced()
        if traced is None:
            return None
        trace, res = traced
        forms = trace.into(k, res[1])
        if forms is None:
            return None
        if forms.shaped:
            if self._shaped is None:
                self._shaped = [()] + [trace.shaped(r) for r in res[1:]]
            res = self._shaped
        return forms.vjp, forms.jvp, res

    def traced(self) -> tuple[StepTrace, list[tuple]] | None:
        """The traced state Jacobian and its residuals at every step ``t >= 1`` (index ``t``),
        or None when the cell cannot be traced (then the products go through :meth:`steps`).
        """
        if not self._tried:
            self._tried = True
            b, T, S = self.shape
            if T > 1:
                names = list(self.params)
                values = [self.params[n] for n in names]
                prev, u = self.prev, self.u
                trace = self.cell.step_trace(names, values, prev[1], u[1])
                if trace is not None:
                    res = [()] + [trace.residuals(values, prev[t], u[t]) for t in range(1, T)]
                    self._traced = (trace, res)
        return self._traced

    # -- products ---------------------------------------------------------------------------
    def jvp(self, X: torch.Tensor, reuse_out: bool = False) -> torch.Tensor:
        """``[k, P] -> [k, b, T, c]`` (a view of a time-major buffer ``[T, b, k, S]``; with
        ``reuse_out``, of a scratch buffer that the next product overwrites).
        """
        b, T, S = self.shape
        k = X.shape[0]
        tang = self.spec.unflatten(X)
        self.cell.count_products(k)
        fast = self.traced_direct()
        # C_t x for every step, time-major with the k vectors of a row side by side: a step of
        # the recurrence is one [b·k, S] block of rows, and the whole buffer is the direct
        # term's rows [T·b, k, S]; overwritten step by step by the state tangents
        C = fresh("cell.jvp", (T, b, k, S), X, self.scratch if reuse_out else None)
        if fast is not None and k == 1:
            fast.jvp([tang[n][0] for n in self.theta], out=C.view(T * b, S))
        elif fast is not None and fast.block_jvp([tang[n] for n in self.theta], C.view(T * b, k, S)):
            pass  # the block in one pass, in place
        elif fast is not None:  # vector by vector, each into its columns
            one = fresh("cell.jvp_one", (T * b, S), X, self.scratch)
            for j in range(k):
                C[:, :, j].copy_(fast.jvp([tang[n][j] for n in self.theta], out=one).view(T, b, S))
        else:
            C.copy_(self._graph_jvp(tang, k))
        out = self.cell.out
        products = self._traced_products(k)
        if products is not None:  # on [b, S] for one vector, [b, k, S] for a block
            _, step, res = products
            xs = (C[:, :, 0] if k == 1 else C).unbind(0)
            for t in range(1, T):
                step(res[t], xs[t - 1], xs[t], xs[t])
            return (C if self._whole else C[..., out]).permute(2, 1, 0, 3)
        Ct = C.transpose(1, 2)  # [T, k, b, S]: the step graphs take the k vectors first
        d = Ct[0]
        ys = [d[..., out]]
        steps = self.steps()
        for t in range(1, T):
            d = steps[t].jvp({"s": d}) + Ct[t]
            ys.append(d[..., out])
        return torch.stack(ys, 2)

    def vjp(self, V: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``[k, b, T, c] -> [k, P]`` (with ``consume``, ``V`` may be overwritten: the
        recurrence then runs in place in a time-major ``V``, as :meth:`jvp` leaves it).
        """
        k = V.shape[0]
        b, T, S = self.shape
        out = self.cell.out
        products = self._traced_products(k)
        Vt = V.permute(2, 1, 0, 3)  # [T, b, k, c]
        if products is not None:  # on [b, S] for one vector, [b, k, S] for a block
            step, _, res = products
            # v time-major in one copy (as the products of J x leave it, that is a plain copy,
            # and none for a consumed V); the recurrence then adds into it in place:
            # λ_{t-1} = v_{t-1} + A_tᵀ λ_t
            if self._whole:
                lams = writable(Vt, consume, "cell.vjp", self.scratch)
            else:
                lams = fresh("cell.vjp", (T, b, k, S), V, self.scratch)
                lams.zero_()
                lams[..., out] = Vt
            ls = (lams[:, :, 0] if k == 1 else lams).unbind(0)
            for t in range(T - 1, 0, -1):
                step(res[t], ls[t], ls[t - 1], ls[t - 1])
        else:
            lams = V.new_zeros(T, b, k, S)
            lam = V.new_zeros(k, b, S)
            steps = self.steps()
            for t in range(T - 1, -1, -1):
                lam = lam.clone()
                lam[..., out] += Vt[t].transpose(0, 1)
                lams[t] = lam.transpose(0, 1)
                if t > 0:
                    lam = steps[t].vjp(lam)["s"]
        fast = self.traced_direct()  # counted by J x: a K or G product is one vector
        rows = lams.view(T * b, k, S)  # the traced direct term's layout
        parts = None
        if fast is not None and k == 1:
            parts = tuple(g.unsqueeze(0) for g in fast.vjp(lams.view(T * b, S)))
        elif fast is not None and fast.block_ready("vjp", rows):
            parts = fast.block_vjp(rows)
        elif fast is not None:  # vector by vector
            each = [fast.vjp(lams[:, :, j].reshape(T * b, S)) for j in range(k)]
            parts = tuple(torch.stack(g) for g in zip(*each))
        if parts is not None:
            grads = dict(zip(self.theta, parts))
        else:
            grads = self._graph_vjp(lams)
        return self.spec.flatten(grads, batch_dims=1)
