"""A one-step cell read off a ``forward`` that loops over time.

Recurrent models are often written with no ``step`` method: ``forward(u)`` starts from a state,
applies the same update at every step and stacks the states. Such a module has a cell although
it names none. Its forward is traced for a few steps (``make_fx`` with symbolic shapes, so the
graph holds for any number of trials), and the operations that make the last state from the
one before it, the parameters and the inputs of that step are cut out of the graph as the cell
``F(θ, s, u_t)``. The step may read the inputs as ``u[:, t]`` or as ``x[:, t]`` of an ``x``
computed from them before the loop (an input projection: redone inside the cell on ``u_t``
alone). A loop that carries several values (an LSTM's ``(h, c)``) gets a cell on those values
side by side (:func:`_cut_step`), started from zeros. The cell is used only once its iteration
reproduces the module's own forward and derivatives
(:func:`lanczos_ntk.operators._cells.find_cell`); any other forward keeps the autograd path.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import fx, nn
from torch.func import functional_call
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["loop_cell_fn", "restoring_attributes"]

_aten = torch.ops.aten
_FULL = 1 << 62  # a slice end at or past this is "to the end"


@contextlib.contextmanager
def restoring_attributes(model: nn.Module) -> Iterator[None]:
    """Undo what a traced run of ``model``'s forward leaves on its modules' attributes.

    A forward that keeps something (``self.last_state = h``) would otherwise keep a traced
    tensor (a fake or wrapped one) after the trace, and the module would break later.
    """
    saved = [(m, dict(m.__dict__), dict(m._buffers)) for m in model.modules()]
    try:
        yield
    finally:
        for m, attributes, buffers in saved:
            for now, before in ((m.__dict__, attributes), (m._buffers, buffers)):
                for key in [k for k in now if k not in before]:
                    del now[key]
                for key, value in before.items():
                    if now.get(key, _MISSING) is not value:
                        now[key] = value


_MISSING = object()


def _unsliced(node: fx.Node) -> fx.Node:
    """``node`` with full slices taken off (``x[:]``, ``x[:, :]`` are ``x``)."""
    while node.op == "call_function" and node.target is _aten.slice.Tensor:
        defaults = [None, 0, None, None, 1]  # slice.Tensor(self, dim, start, end, step)
        base, _, start, end, step = list(node.args) + defaults[len(node.args) :]
        if start not in (0, None) or step != 1 or not isinstance(base, fx.Node):
            break
        if not (end is None or (isinstance(end, int) and end >= _FULL)):
            break
        node = base
    return node


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _stacked(result: fx.Node) -> list[fx.Node] | None:
    """The states ``h_t`` of an output ``[b, T, S]`` written as ``torch.stack(states, 1)``,
    ``torch.stack(states).transpose(0, 1)`` (or ``.permute(1, 0, 2)``) or
    ``torch.cat([h.unsqueeze(1) for h in states], 1)``; else None.
    """

    def listed(node: fx.Node) -> list[fx.Node] | None:
        items = node.args[0]
        if not isinstance(items, (list, tuple)) or not all(isinstance(n, fx.Node) for n in items):
            return None
        return [n for n in items if isinstance(n, fx.Node)]

    def dim(node: fx.Node) -> object:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)

    if result.target in (_aten.transpose.int, _aten.permute.default):
        swapped = tuple(result.args[1:]) in ((0, 1), (1, 0)) or result.args[1] == [1, 0, 2]
        inner = result.args[0]
        if not swapped or not isinstance(inner, fx.Node) or inner.target is not _aten.stack.default:
            return None
        return listed(inner) if dim(inner) in (0, -3) else None
    if result.target is _aten.stack.default:
        return listed(result) if dim(result) in (1, -2) else None
    if result.target is _aten.cat.default and dim(result) in (1, -2):
        parts = listed(result)
        if parts is None:
            return None
        if not all(p.target is _aten.unsqueeze.default and p.args[1] in (1, -2) for p in parts):
            return None
        return [p.args[0] for p in parts if isinstance(p.args[0], fx.Node)]
    return None


def _trailing(node: fx.Node, free: set) -> tuple[int, ...] | None:
    """The sizes after the first (the trials) of a traced value, as ints: sizes that follow
    from the parameters' take the values seen in the trace; None if one depends on the symbols
    in ``free`` (the number of trials or of steps).
    """
    val = node.meta.get("val")
    shape = getattr(val, "shape", None)
    if shape is None or len(shape) < 2:
        return None
    sizes = []
    for d in shape[1:]:
        if isinstance(d, torch.SymInt):
            if d.node.expr.free_symbols & free or d.node.hint is None:
                return None
            d = d.node.hint
        sizes.append(int(d))
    return tuple(sizes)


def _cut_step(
    traced: fx.GraphModule, num_params: int, steps: int
) -> tuple[fx.GraphModule, int, slice] | None:
    """The step ``t = steps - 2`` of a traced forward as a graph ``(*params, s, u_t) -> s'`` on
    the values the loop carries from step to step (the state alone, or an LSTM's ``(h, c)``)
    flattened side by side into one state ``s [b, S]``; with ``S`` and the slice of ``s`` that is
    the stacked output. None when the forward does not have that form.

    Every operation is assigned to the last step whose inputs it depends on, or to the first
    step that uses it if that is later. The values step ``t`` takes from earlier steps and
    those step ``t + 1`` takes from step ``t`` (or earlier) are the carried state before and
    after the step, matched in the order the forward makes them; the stacked state is one of
    them (added when no later step reads it).
    """
    graph = traced.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    params, u = inputs[:num_params], inputs[num_params]
    (result,) = [n for n in graph.nodes if n.op == "output"][0].args
    states = _stacked(result) if isinstance(result, fx.Node) else None
    if states is None or len(states) != steps or steps < 4:
        return None
    t = steps - 2

    reads: dict[fx.Node, tuple[int, fx.Node] | None] = {}
    carried = set(states)  # a read is of the inputs, or of what is made of them before the loop

    def read(node: fx.Node) -> tuple[int, fx.Node] | None:  # x[:, j] of u or a projection of it
        if node not in reads:
            reads[node] = None
            if node.op == "call_function" and node.target is _aten.select.int and node.args[1] == 1:
                source, j = node.args[0], node.args[2]
                if isinstance(source, fx.Node) and isinstance(j, int):
                    x, before_loop = _unsliced(source), _ancestors(source)
                    if x is u or (u in before_loop and not before_loop & carried):
                        reads[node] = (j, x)
        return reads[node]

    step: dict[fx.Node, int] = {}  # the last step whose inputs a value depends on (-1: none)
    for node in graph.nodes:
        r = read(node)
        if r is not None:
            step[node] = r[0]
        else:
            step[node] = max((step[a] for a in node.all_input_nodes), default=-1)
    for r in (read(n) for n in graph.nodes):
        if r is not None and r[1] is not u and step[r[1]] != -1:
            return None  # a "projection" that depends on the steps

    # the gathering of the states into the output is no step's operation
    gather = _ancestors(result) - set().union(*(_ancestors(h) for h in states))
    # an operation on the previous steps' values used only by a later step (``h @ Wᵀ`` for the
    # next step's gates) is that later step's: the carried state stays the loop's own variables
    for node in reversed(graph.nodes):
        users = [n for n in node.users if n not in gather and n.op != "output"]
        if step[node] >= 0 and read(node) is None and node not in states and users:
            step[node] = max(step[node], min(step[n] for n in users))

    def taken_by(j: int) -> list[fx.Node]:
        """Values made before step ``j`` and used by it, in the forward's order."""
        used = {
            a
            for n in graph.nodes
            if step[n] == j and n not in gather and n.op != "output"
            for a in n.all_input_nodes
            if 0 <= step[a] < j
        }
        return [n for n in graph.nodes if n in used]

    before, after = taken_by(t), taken_by(t + 1)
    if states[t - 1] not in before and states[t] not in after:
        before, after = before + [states[t - 1]], after + [states[t]]
    if (
        len(before) != len(after)
        or states[t] not in after
        or before.index(states[t - 1]) != after.index(states[t])
    ):
        return None
    probe = u.meta.get("val")
    free = set().union(*(d.node.expr.free_symbols for d in probe.shape[:2] if isinstance(d, torch.SymInt)))
    sizes = []
    for a, b in zip(before, after):
        shape = _trailing(a, free)
        if shape is None or shape != _trailing(b, free):
            return None
        sizes.append(shape)

    cut = fx.Graph()
    env: dict[fx.Node, fx.Node] = {p: cut.placeholder(f"p{i}") for i, p in enumerate(params)}
    s_in = cut.placeholder("s")
    u_t = cut.placeholder("u")
    widths = [int(torch.Size(sh).numel()) for sh in sizes]
    plain = len(before) == 1 and len(sizes[0]) == 1  # one carried vector: the state as it is
    offset = 0
    for node, shape, width in zip(before, sizes, widths):
        if plain:
            env[node] = s_in
        else:
            piece = cut.call_function(_aten.slice.Tensor, (s_in, 1, offset, offset + width))
            env[node] = cut.call_function(_aten.reshape.default, (piece, [-1, *shape]))
        offset += width
    one_step: dict[fx.Node, fx.Node] = {}

    def emit(node: fx.Node) -> fx.Node:
        """``node`` in the cut: step ``t``'s operations, and what they need from before the loop."""
        if node in env:
            return env[node]
        r = read(node)
        if r is not None and r[0] == t:
            x = r[1]
            if x is u:
                env[node] = u_t
            else:
                if u not in one_step:
                    one_step[u] = cut.call_function(_aten.unsqueeze.default, (u_t, 1))
                before_loop = _ancestors(x)
                for n in graph.nodes:
                    if n in before_loop and n not in one_step:
                        one_step[n] = env[n] if n in params else cut.node_copy(n, lambda m: one_step[m])
                env[node] = cut.call_function(_aten.select.int, (one_step[x], 1, 0))
            return env[node]
        if node is u or r is not None:
            raise _NotAStep  # the inputs of another step, or read in another way
        if node.target is _aten.sym_size.int and node.args[0] is u:
            axis = {0: 0, 2: 1}.get(cast(int, node.args[1]))
            if axis is None:
                raise _NotAStep
            env[node] = cut.call_function(_aten.sym_size.int, (u_t, axis))
            return env[node]
        for a in node.all_input_nodes:
            emit(a)
        env[node] = cut.node_copy(node, lambda n: env[n])
        return env[node]

    try:
        if plain:
            cut.output(emit(after[0]))
        else:
            outs = [
                cut.call_function(_aten.reshape.default, (emit(n), [-1, w])) for n, w in zip(after, widths)
            ]
            cut.output(cut.call_function(_aten.cat.default, (outs, 1)))
    except _NotAStep:
        return None
    h = after.index(states[t])
    start = sum(widths[:h])
    return fx.GraphModule(traced, cut), offset, slice(start, start + widths[h])


class _NotAStep(Exception):
    """The cut reached what the carried state does not determine (another step's inputs)."""


def loop_cell_fn(
    model: nn.Module, params: dict, u: torch.Tensor, width: int
) -> tuple[Callable, int, slice] | None:
    """``(F(params, s, u_t), S, out)`` cut out of ``model``'s forward (``S`` the state size,
    ``s[..., out]`` the output), or None (see the module docstring).

    The probe sizes (trials and steps) differ from every size of the parameters and inputs, so
    that the symbolic trace does not tie the number of trials to another size.
    """
    names = list(params)
    values = [params[n] for n in names]
    taken = {int(s) for v in values for s in v.shape} | {int(u.shape[-1]), width, 0, 1}
    steps = next(s for s in itertools.count(4) if s not in taken)
    trials = next(b for b in itertools.count(steps + 1) if b not in taken)
    probe = u.new_zeros(trials, steps, u.shape[-1])

    def forward(*flat: torch.Tensor) -> torch.Tensor:
        return functional_call(model, dict(zip(names, flat[:-1])), (flat[-1],))

    try:
        with warnings.catch_warnings(), restoring_attributes(model):
            warnings.simplefilter("ignore")
            traced = make_fx(forward, tracing_mode="symbolic", _allow_non_fake_inputs=True)(*values, probe)
        cut = _cut_step(traced, len(values), steps)
    except Exception:  # a forward the tracer cannot follow: the autograd path
        return None
    if cut is None:
        return None
    run = cut[0].forward

    def fn(p: dict, s: torch.Tensor, u_t: torch.Tensor) -> torch.Tensor:
        return run(*[p[n] for n in names], s, u_t)

    return fn, cut[1], cut[2]
