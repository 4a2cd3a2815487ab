"""One-step cells of recurrent models, as pure functions of the parameters.

The cell-linearised product path (:mod:`lanczos_ntk.operators._cell_path`) needs a model as
``s_{t+1} = F(θ, s_t, u_t)`` with a flat state ``s [N, S]`` and the outputs as a fixed slice of
the state. This module finds that form for

- the built-in models (their ``step``),
- batch-first ``torch.nn.RNN`` / ``GRU`` / ``LSTM`` (their cell equations written out, weights
  read from the module by name, so fused kernels are not needed),
- user modules with a documented ``step(h, u) -> h_next`` method whose ``forward(u)`` iterates it
  from ``initial_state(B)`` (or zeros) and returns the stacked states,
- user modules without one whose ``forward`` has that form (the update read off a trace,
  :mod:`lanczos_ntk.operators._loop_cell`).

A cell is accepted only after its iteration reproduces the model's own forward on one trial
(a cell read off the forward: and the module's own derivatives there).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ._functional import _TORCH_RNNS
from ._loop_cell import loop_cell_fn
from ._rnn_path import TorchRNNLinearization, rnn_kind
from ._rnn_path import trial_bytes as rnn_trial_bytes
from ._traced_step import (
    DirectTrace,
    StepTrace,
    check_direct,
    check_step,
    same_to_rounding,
    trace_direct,
    trace_step,
)

__all__ = ["LOOP", "Cell", "find_cell"]

LOOP = "loop read off forward"  # the name of a cell cut out of a forward without a step method


# vectors through a module's cells before its direct term is traced, on chunks of fewer than
# DIRECT_TRACE_NOW states: there the trace and its check (0.04 s at b=64, T=50, S=64) cost about
# what the traced form saves in 100 products (0.3 ms each), so a first top-10 solve (48
# products with its check) keeps the recorded graph, and longer runs (SLQ, later operators on
# the same module) have the traced form from the 64th vector on. On larger chunks the saving
# (2.5 ms per product at 3.3M states) pays for the trace (0.17 s) within a top-10 solve:
# traced at once (first top-10 at 3.3M states, three fresh modules each: 1.35-1.43 s against
# 1.46-1.57 s deferred)
DIRECT_TRACE_AFTER = 64
DIRECT_TRACE_NOW = 1_000_000


def _direct_key(names: Sequence[str], moving: Sequence[str], s: torch.Tensor, u: torch.Tensor) -> tuple:
    return ("direct", tuple(names), tuple(moving), tuple(s.shape), tuple(u.shape), s.dtype, s.device)


class Traces(dict):
    """The traces of a module's cells by shape, and how many vectors went through them."""

    products = 0


class Cell:
    """``F(params, s [N, S], u [N, d]) -> s' [N, S]``; the outputs are ``s[..., out]``.

    Attributes
    ----------
    state_size : int
        ``S``, the flat state size (for an LSTM: hidden and cell states of every layer).
    out : slice
        The part of the state that is the model's output at each step.
    initial : callable ``(h0 or None, b, dtype, device) -> s0 [b, S]``
    closed_form : callable ``(spec, params, u, h0) -> linearisation`` or None
        A linearisation written for this cell's equations (torch's recurrent layers), used
        instead of the generic one of :mod:`lanczos_ntk.operators._cell_path`.
    trial_bytes : callable ``(d, T, itemsize) -> (cached, work per vector)`` or None
        The closed form's memory per trial.
    """

    def __init__(
        self,
        fn: Callable,
        state_size: int,
        out: slice,
        initial: Callable,
        name: str,
        closed_form: Callable | None = None,
        trial_bytes: Callable | None = None,
    ):
        self.fn, self.state_size, self.out, self.initial, self.name = fn, state_size, out, initial, name
        self.closed_form, self.trial_bytes = closed_form, trial_bytes
        # step traces and direct-term traces, per shape; shared by the cells of one module
        # (share_traces), each checked by every cell that uses it before its first use there
        self._traces: Traces = Traces()
        self._checked: set[tuple] = set()

    def share_traces(self, traces: Traces) -> Cell:
        """Use (and add to) ``traces``, the traces of the module's earlier cells."""
        self._traces = traces
        return self

    def __call__(self, params, s, u):
        return self.fn(params, s, u)

    def step_trace(
        self, names: Sequence[str], values: Sequence[torch.Tensor], s: torch.Tensor, u: torch.Tensor
    ) -> StepTrace | None:
        """The state Jacobian traced at ``s``'s shape, once per shape, dtype and device
        (:func:`~lanczos_ntk.operators._traced_step.trace_step`); None when it cannot be.
        """
        key = (tuple(names), tuple(s.shape), tuple(u.shape), s.dtype, u.dtype, s.device)
        if key not in self._checked:  # traced here, or by an earlier cell: checked here
            known = self._traces.get(key)
            if known is None or not check_step(known, self.fn, names, values, s, u):
                self._traces[key] = trace_step(self.fn, names, values, s, u)
            self._checked.add(key)
        return self._traces[key]

    def direct_trace(
        self,
        names: Sequence[str],
        values: Sequence[torch.Tensor],
        moving: Sequence[str],
        s: torch.Tensor,
        u: torch.Tensor,
    ) -> DirectTrace | None:
        """The direct term over the rows ``s, u`` traced (once per shape, dtype, device and set
        of differentiated parameters, :func:`~lanczos_ntk.operators._traced_step.trace_direct`)
        with its residuals at these values; None when it cannot be.
        """
        key = _direct_key(names, moving, s, u)
        soon = self._traces.products >= DIRECT_TRACE_AFTER or s.numel() >= DIRECT_TRACE_NOW
        if key not in self._traces and not soon:
            return None  # not yet worth a trace (see DIRECT_TRACE_AFTER)
        if key not in self._checked:
            known = self._traces.get(key)
            known = None if known is None else check_direct(known, self.fn, names, values, moving, s, u)
            self._traces[key] = known or trace_direct(self.fn, names, values, moving, s, u)
            self._checked.add(key)
        form = self._traces[key]
        if form is None:
            return None
        try:
            return DirectTrace(form, (*values, s, u))
        except Exception:  # the values do not replay: the recorded graph instead
            return None

    def direct_traced(
        self, names: Sequence[str], moving: Sequence[str], s: torch.Tensor, u: torch.Tensor
    ) -> bool:
        """Whether the direct term at these shapes was traced (or found untraceable)."""
        return _direct_key(names, moving, s, u) in self._traces

    def count_products(self, k: int) -> None:
        """Count ``k`` vectors through ``J x`` (see DIRECT_TRACE_AFTER; a ``K`` or ``G``
        product, one ``J x`` and one ``Jᵀ v``, counts once).
        """
        self._traces.products += k

    def states(self, params, u, h0) -> torch.Tensor:
        """Iterate the cell: all states ``[b, T, S]`` after each step (no autograd)."""
        b, T, _ = u.shape
        s = self.initial(h0, b, u.dtype, u.device)
        out = []
        for t in range(T):
            s = self.fn(params, s, u[:, t])
            out.append(s)
        return torch.stack(out, 1)


class _StepView(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, h, u):
        return self.m.step(h, u)


def _step_cell(model, width: int) -> Cell:
    view = _StepView(model)

    def fn(params, s, u):
        return functional_call(view, {"m." + k: v for k, v in params.items()}, (s, u))

    # the traces (code, not values) serve the module's later operators, each checked again
    return _iterated_cell(model, width, fn, "step").share_traces(_STEP_TRACES.setdefault(model, Traces()))


def _loop_cell(model, width: int, fn: Callable, size: int, out: slice) -> Cell:
    """A cell read off the forward: its state the output alone, or the values the loop carries
    (started from zeros).
    """
    if size == width and out == slice(0, width):
        return _iterated_cell(model, width, fn, LOOP)

    def zeros(h0, b, dtype, device):
        return torch.zeros(b, size, dtype=dtype, device=device)

    return Cell(fn, size, out, zeros, LOOP)


def _iterated_cell(model, width: int, fn: Callable, name: str) -> Cell:
    """A cell whose state is the output, started from ``model.initial_state`` or zeros. It holds
    the model weakly: a cached cell must not keep its module alive.
    """
    module = weakref.ref(model)

    def initial(h0, b, dtype, device):
        if h0 is not None:
            return h0
        init = getattr(module(), "initial_state", None)
        if callable(init):
            return init(b, dtype=dtype, device=device)
        return torch.zeros(b, width, dtype=dtype, device=device)

    return Cell(fn, width, slice(0, width), initial, name)


def _torch_rnn_cell(model) -> Cell | None:
    if model.bidirectional or getattr(model, "proj_size", 0) or (model.training and model.dropout):
        return None
    L, H = model.num_layers, model.hidden_size
    lstm = isinstance(model, nn.LSTM)
    if isinstance(model, nn.RNN):
        act = torch.tanh if model.nonlinearity == "tanh" else torch.relu
    bias = model.bias

    def fn(params, s, u):
        hs = s.split(H, dim=-1)
        x, new_h, new_c = u, [], []
        for layer in range(L):
            w_ih, w_hh = params[f"weight_ih_l{layer}"], params[f"weight_hh_l{layer}"]
            gi = x @ w_ih.T
            h = hs[layer]
            gh = h @ w_hh.T
            if bias:
                gi = gi + params[f"bias_ih_l{layer}"]
                gh = gh + params[f"bias_hh_l{layer}"]
            if lstm:
                c = hs[L + layer]
                i, f, g, o = (gi + gh).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                new_c.append(c)
            elif isinstance(model, nn.GRU):
                ir, iz, in_ = gi.chunk(3, dim=-1)
                hr, hz, hn = gh.chunk(3, dim=-1)
                r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
                h = (1 - z) * torch.tanh(in_ + r * hn) + z * h
            else:
                h = act(gi + gh)
            new_h.append(h)
            x = h
        return torch.cat(new_h + new_c, dim=-1)

    S = (2 if lstm else 1) * L * H

    def initial(h0, b, dtype, device):
        if h0 is None:
            return torch.zeros(b, S, dtype=dtype, device=device)
        parts = h0 if isinstance(h0, tuple) else (h0,)
        return torch.cat([p.permute(1, 0, 2).reshape(b, L * H) for p in parts], dim=-1)

    kind = rnn_kind(model)

    def closed(spec, params, u, h0):
        def states(q):  # the module's own forward (its fused kernels) at params with q substituted
            return functional_call(model, {**params, **q}, (u,) if h0 is None else (u, h0))[0]

        s0 = initial(h0, u.shape[0], u.dtype, u.device)
        return TorchRNNLinearization(kind, L, H, spec, params, u, s0, module_states=states)

    def memory(d, T, itemsize):
        return rnn_trial_bytes(kind, L, H, d, T, itemsize)

    return Cell(
        fn,
        S,
        slice((L - 1) * H, L * H),
        initial,
        f"torch.nn.{type(model).__name__} cell, closed form",
        closed,
        memory,
    )


#: Cells read off forwards, per module and sizes: reading one costs a symbolic trace (about
#: 0.1 s), and operators on the same module (a training loop) would read it again. A cached cell
#: is used only after it reproduces the module's forward and derivatives, like a new one.
_LOOP_CELLS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Cell]] = weakref.WeakKeyDictionary()
_STEP_TRACES: weakref.WeakKeyDictionary[nn.Module, Traces] = weakref.WeakKeyDictionary()


def find_cell(
    model: nn.Module, width: int, params: dict, u: torch.Tensor, h0, reference: torch.Tensor
) -> Cell | None:
    """The model's one-step cell, if it has one that reproduces ``reference`` (its forward on
    the inputs ``u`` of one trial, with ``params``: every parameter and buffer by name), else
    ``None``.
    """
    if isinstance(model, _TORCH_RNNS):
        cell = _torch_rnn_cell(model)
    elif callable(getattr(model, "step", None)):
        cell = _step_cell(model, width)
    elif h0 is None:  # a forward that loops over one update, with no step method
        key = (width, u.shape[-1], tuple((n, v.shape, v.dtype, v.device) for n, v in params.items()))
        known = _LOOP_CELLS.get(model, {}).get(key)
        if known is not None and _reproduces(model, known, params, u, h0, reference):
            return known
        found = loop_cell_fn(model, params, u, width)
        cell = None if found is None else _loop_cell(model, width, *found)
        if cell is not None and _reproduces(model, cell, params, u, h0, reference):
            _LOOP_CELLS.setdefault(model, {})[key] = cell
            return cell
        return None
    else:
        return None
    return cell if cell is not None and _reproduces(model, cell, params, u, h0, reference) else None


def _reproduces(model: nn.Module, cell: Cell, params: dict, u: torch.Tensor, h0, reference) -> bool:
    """Whether iterating ``cell`` gives the model's forward on one trial (and, for a cell read
    off the forward, its derivatives too).
    """
    try:
        with torch.no_grad():
            got = cell.states(params, u, h0)[..., cell.out]
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    if got.shape != reference.shape or not same_to_rounding(got, reference, 1.0):
        return False
    return cell.name != LOOP or _same_derivatives(model, cell, params, u)


def _same_derivatives(model: nn.Module, cell: Cell, params: dict, u: torch.Tensor) -> bool:
    """Whether a cell read off the forward has the module's own derivatives: ``Jᵀ v`` on the
    trial ``u`` through the module's autograd and through the iterated cell. The trace records
    the operations a custom ``autograd.Function`` runs forward, not its own backward (a
    surrogate gradient, a straight-through estimator), which only the module's autograd knows.
    """
    p = {k: v.detach().requires_grad_(v.is_floating_point()) for k, v in params.items()}
    leaves = [v for v in p.values() if v.requires_grad]
    try:
        with torch.enable_grad():
            want = functional_call(model, p, (u,))
            got = cell.states(p, u, None)[..., cell.out]
            v = torch.randn(want.shape, generator=torch.Generator().manual_seed(0), dtype=want.dtype)
            v = v.to(want.device)
            g_want = torch.autograd.grad(want, leaves, v, allow_unused=True)
            g_got = torch.autograd.grad(got, leaves, v, allow_unused=True)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    for a, b, leaf in zip(g_got, g_want, leaves):
        a = torch.zeros_like(leaf) if a is None else a
        b = torch.zeros_like(leaf) if b is None else b
        if not same_to_rounding(a, b, 1.0):
            return False
    return True
