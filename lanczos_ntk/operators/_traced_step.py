"""A cell's state Jacobian as straight-line code, traced once per state shape.

The cell path (:mod:`lanczos_ntk.operators._cell_path`) spends its time in the products with
``A_t = ∂F/∂s`` at every step of the trajectory: ``Aᵀ λ`` in ``Jᵀ v``, ``A δ`` in ``J x``.
Through an autograd graph recorded per step each costs one pass of autograd's engine, whose
bookkeeping (tens of µs) outweighs the arithmetic on small states. Here the VJP of ``F`` in
``s`` and the VJP of that VJP (which is ``A δ``: the VJP is linear in its cotangent) are traced
once into graphs of aten operations (:func:`torch.fx.experimental.proxy_tensor.make_fx` on fake
tensors: shapes only, no data, so a branch on the data fails the trace instead of being baked
in). Each graph is split in two:

- the *residual* part, which depends on the parameters, the state and the input only (for a
  ``tanh`` cell, ``tanh s``): evaluated once per step when the trajectory is linearised;
- the *linear* part, which depends on the vector: run per product, a handful of tensor
  operations with no engine in between.

A trace is accepted only after its products agree with autograd's on one step of the real
trajectory; a cell that cannot be traced (data-dependent control flow, operations without a
trace) keeps the per-step autograd graphs. Blocks of ``k`` vectors ``[b, k, S]`` (the vectors of a row
side by side) run the folded form of one vector as it is, its matrix products taken over the
``b·k`` rows, its dimension arguments counted from the end and its residuals with rows given a
singleton for ``k`` (:func:`rows_batched`); a map with the row's shape written into it runs the
linear part traced once more under ``vmap`` instead (unfolded). Both are checked against the
single-vector form column by column.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

import torch
from torch import fx
from torch.fx.experimental.proxy_tensor import make_fx

from ._block_direct import ELEMENTWISE as _ELEMENTWISE
from ._block_direct import Block, run_block

__all__ = [
    "DirectForm",
    "DirectTrace",
    "StepTrace",
    "accumulating",
    "check_direct",
    "check_step",
    "same_to_rounding",
    "trace_direct",
    "trace_step",
]


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _any_strides(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with its views as reshapes: a trace on one memory layout then runs on any (a
    view of a strided tensor, such as a time step of a trajectory, may not exist).
    """
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = torch.ops.aten.reshape.default
    # a matrix transposed twice is the matrix (``permute(x, [1, 0])`` of a matrix is ``x.t()``):
    # the products' matrix multiplications then read the terms they are summed with directly
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.aten.permute.default and list(node.args[1]) == [1, 0]:
            node.target, node.args = torch.ops.aten.t.default, (node.args[0],)
        inner = node.args[0] if node.args else None
        if (
            node.target is torch.ops.aten.t.default
            and isinstance(inner, fx.Node)
            and inner.op == "call_function"
            and inner.target is torch.ops.aten.t.default
        ):
            node.replace_all_uses_with(inner.args[0])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _linear_nodes(graph: fx.Graph, vectors: Sequence[fx.Node]) -> set[fx.Node]:
    """The nodes of ``graph`` whose values depend on ``vectors`` (those included)."""
    linear = set(vectors)
    for node in graph.nodes:
        if node.op != "output" and any(a in linear for a in node.all_input_nodes):
            linear.add(node)
    return linear


def _derivatives_as_factors(graph: fx.Graph, vectors: Sequence[fx.Node]) -> None:
    """Rewrite, in place, ``tanh_backward(x, y)`` and ``sigmoid_backward(x, y)`` whose ``x``
    depends on the vector and ``y`` does not as ``x * d``, the factor ``d`` (``1 - y²``,
    ``y (1 - y)``) made from ``y`` alone: ``d`` then is a residual, evaluated once per step
    instead of in every product, and a sum of such terms folds into one ``addcmul``
    (:func:`accumulating`).
    """
    linear = _linear_nodes(graph, vectors)
    mul, rsub = _aten.mul.Tensor, _aten.rsub.Scalar
    for node in list(graph.nodes):
        kinds = (_aten.tanh_backward.default, _aten.sigmoid_backward.default)
        if node.op != "call_function" or node.target not in kinds or len(node.args) != 2 or node.kwargs:
            continue
        x, y = node.args
        if x not in linear or not isinstance(y, fx.Node) or y in linear or "val" not in y.meta:
            continue
        with graph.inserting_before(node):
            if node.target is _aten.tanh_backward.default:  # 1 - y²
                made = [graph.call_function(mul, (y, y))]
                made.append(graph.call_function(rsub, (made[0], 1)))
            else:  # y (1 - y)
                made = [graph.call_function(rsub, (y, 1))]
                made.append(graph.call_function(mul, (y, made[0])))
            scaled = graph.call_function(mul, (x, made[-1]))
        for m in made:
            m.meta = {"val": y.meta["val"]}
        scaled.meta = dict(node.meta)
        node.replace_all_uses_with(scaled)
        graph.erase_node(node)


def _factors_merged(graph: fx.Graph, vectors: Sequence[fx.Node]) -> None:
    """Rewrite, in place, ``(x * r1) * r2`` with ``x`` depending on the vector, ``r1`` and
    ``r2`` not, and ``x * r1`` read once, as ``x * (r1 * r2)``: the two fixed factors (an
    activation's derivative and a gate, say) become one residual, made once per step, and a
    product takes one pass over the vector less.
    """
    mul = _aten.mul.Tensor

    def fixed(n: Any, linear: set) -> bool:
        return isinstance(n, fx.Node) and n not in linear and isinstance(n.meta.get("val"), torch.Tensor)

    # one pass in graph order: a chain ((x r1) r2) r3 merges link by link, since a merged
    # product stays linear and its new factor fixed
    linear = _linear_nodes(graph, vectors)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not mul or len(node.args) != 2 or node.kwargs:
            continue
        for inner, r2 in (node.args, node.args[::-1]):
            if not (isinstance(inner, fx.Node) and inner.target is mul and inner.op == "call_function"):
                continue
            if len(inner.users) != 1 or len(inner.args) != 2 or inner.kwargs or not fixed(r2, linear):
                continue
            x, r1 = inner.args if fixed(inner.args[1], linear) else inner.args[::-1]
            if not (isinstance(x, fx.Node) and x in linear and fixed(r1, linear)):
                continue
            v1, v2 = cast(fx.Node, r1).meta["val"], cast(fx.Node, r2).meta["val"]
            try:
                shape = torch.broadcast_shapes(v1.shape, v2.shape)
            except RuntimeError:
                continue
            like = v1 if tuple(v1.shape) == tuple(shape) else v2
            result = node.meta.get("val")
            same_type = isinstance(result, torch.Tensor) and v1.dtype == v2.dtype == result.dtype
            if tuple(like.shape) != tuple(shape) or not same_type:  # e.g. float32 buffers, float64 state
                continue
            with graph.inserting_before(node):
                both = graph.call_function(mul, (r1, r2))
            both.meta = {"val": like}
            node.args = (x, both)
            graph.erase_node(inner)
            break


def _both_nodes(node: fx.Node) -> bool:
    """Whether ``node`` has exactly two arguments, both nodes (not numbers)."""
    return len(node.args) == 2 and all(isinstance(a, fx.Node) for a in node.args) and not node.kwargs


def _is_view(node: fx.Node) -> bool:
    """Whether ``node``'s value may share memory with its first argument (a view or an item)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return True
    if not isinstance(node.target, torch._ops.OpOverload):
        return False
    return any(r.alias_info is not None and not r.alias_info.is_write for r in node.target._schema.returns)


def _writes_into_inputs(graph: fx.Graph) -> bool:
    """Whether an operation of ``graph`` writes into the memory of one of its inputs or
    constants. Replayed per product, it would overwrite the stored residuals, the trajectory or
    the caller's vector; writing into a tensor made within the graph is harmless.
    """
    for node in graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable:
            continue
        for i, arg in enumerate(schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
            roots = value if isinstance(value, (list, tuple)) else [value]
            for root in roots:
                while isinstance(root, fx.Node) and _is_view(root):
                    root = root.args[0]
                if isinstance(root, fx.Node) and root.op in ("placeholder", "get_attr"):
                    return True
    return False


_aten = torch.ops.aten
_SCALED = {_aten.mul.Tensor: 1, _aten.div.Tensor: -1}  # by a number: its power


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else None


def _terms(node: Any, memo: dict) -> dict | None:
    """``node`` as a linear combination ``{atom: coefficient}`` of the nodes that are not sums,
    differences, negations or multiples by a number of others of its shape (None: an atom).
    """
    if node in memo:
        return memo[node]
    out = None
    args = node.args
    if node.op == "call_function" and _shape(node) is not None:
        target, here = node.target, _shape(node)
        same = [isinstance(a, fx.Node) and _shape(a) == here for a in args[:2]]
        if target in (_aten.add.Tensor, _aten.sub.Tensor) and len(args) == 2 and all(same):
            alpha = node.kwargs.get("alpha", 1)
            if isinstance(alpha, (int, float)):
                sign = alpha if target is _aten.add.Tensor else -alpha
                out = dict(_terms(args[0], memo) or {args[0]: 1.0})
                for atom, c in (_terms(args[1], memo) or {args[1]: 1.0}).items():
                    out[atom] = out.get(atom, 0.0) + sign * c
        elif target is _aten.neg.default and same[:1] == [True]:
            out = {a: -c for a, c in (_terms(args[0], memo) or {args[0]: 1.0}).items()}
        elif target in _SCALED and len(args) == 2 and same[0] and isinstance(args[1], (int, float)):
            if not isinstance(args[1], bool) and args[1] != 0:
                f = float(args[1]) ** _SCALED[target]
                out = {a: f * c for a, c in (_terms(args[0], memo) or {args[0]: 1.0}).items()}
    memo[node] = out
    return out


# operations homogeneous of degree one in the argument positions listed: ``f(c x) = c f(x)``
_HOMOGENEOUS = {
    _aten.mm.default: (0, 1),
    _aten.tanh_backward.default: (0,),
    _aten.sigmoid_backward.default: (0,),
    _aten.t.default: (0,),
    _aten.permute.default: (0,),
    _aten.reshape.default: (0,),
    _aten.expand.default: (0,),
    _aten.sum.dim_IntList: (0,),
}


def _scales_pushed_down(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with multiples by numbers moved past the operations homogeneous in
    them (``mm(0.1 v, W)`` becomes ``0.1 mm(v, W)``), down to the sums that fold them for free
    (or to the outputs). Every operation keeps its shape, so no pass is added.
    """
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    moved = True
    while moved:
        moved = False
        for node in list(copy.nodes):
            if node.op != "call_function" or node.target is not _aten.mul.Tensor or len(node.args) != 2:
                continue
            x, c = node.args
            if not isinstance(x, fx.Node) or not isinstance(c, (int, float)) or isinstance(c, bool):
                continue
            for user in list(node.users):
                where = _HOMOGENEOUS.get(user.target) if user.op == "call_function" else None
                if user.op == "call_function" and user.target is _aten.mul.Tensor and _both_nodes(user):
                    where = (0, 1)  # an elementwise product with another tensor (not a scale)
                if where is None or any(a is node for i, a in enumerate(user.args) if i not in where):
                    continue
                if sum(a is node for a in user.args) != 1 or "val" not in user.meta:
                    continue
                user.replace_input_with(node, x)
                with copy.inserting_after(user):
                    scaled = copy.call_function(_aten.mul.Tensor, (user, c))
                scaled.meta = dict(user.meta)
                user.replace_all_uses_with(scaled, delete_user_cb=lambda u, s=scaled: u is not s)
                moved = True
            if not node.users:
                copy.erase_node(node)
    return copy


def _holding(acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` holding ``acc`` (nothing to do when ``out`` is ``acc``)."""
    return out if out is acc else out.copy_(acc)


def _slice_of(node: Any) -> tuple[int, int, int] | None:
    """For ``slice_backward`` with a unit step and known bounds (a value placed in a slice of
    zeros: the adjoint of a slice of the state, e.g. one half of a ``cat``): the slice as
    ``(dimension counted from the end, start, length)``; else None.
    """
    if not isinstance(node, fx.Node) or node.target is not _aten.slice_backward.default:
        return None
    args = node.args
    if (
        len(args) != 6
        or not isinstance(args[1], (list, tuple))
        or not all(isinstance(a, int) for a in args[2:])
    ):
        return None
    sizes = [int(cast(int, n)) if isinstance(n, int) else None for n in args[1]]
    dim, start, end, step = (int(cast(int, a)) for a in args[2:])
    if step != 1 or not -len(sizes) <= dim < len(sizes):
        return None
    size = sizes[dim]
    if size is None:
        return None
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else min(end, size))
    if not 0 <= start <= end <= size:
        return None
    return (dim if dim < 0 else dim - len(sizes)), start, end - start


def accumulating(gm: fx.GraphModule, acc: bool = True) -> fx.GraphModule:
    """From the linear part ``L(r..., v)``: ``(r..., v, acc, out) -> out = acc + L(r..., v)``
    (``acc=False``: ``(r..., v, out) -> out = L(r..., v)``, ``out`` not an input), with the
    sums, differences and multiples by numbers folded into as few operations as possible
    (``acc + 0.9 v + 0.1 (d @ W)`` becomes ``out = acc + 0.9 v`` and ``out += 0.1 d @ W``;
    matrix products summed with others become ``addmm`` s; a value placed in a slice of zeros,
    ``slice_backward(x)``, is added into that slice of ``out``, its own terms folded the same
    way), instead of one pass over the state per operation. Multiples by numbers are first
    moved past the operations homogeneous in them, so that they reach the sums. ``out`` may be
    ``acc`` itself, never ``v``.
    """
    nodes = list(_scales_pushed_down(gm.graph).nodes)
    output = next(n for n in nodes if n.op == "output")
    (result,) = output.args
    memo: dict = {}
    for node in nodes:
        _terms(node, memo)
    new = fx.Graph()
    env: dict = {n: new.placeholder(n.name) for n in nodes if n.op == "placeholder"}
    for old, placeholder in env.items():
        placeholder.meta = dict(old.meta)  # shapes, read by rows_batched's dimension arguments
    if acc:
        env["acc"] = new.placeholder("acc")
    out = new.placeholder("out")
    # how often each atom is read, by other atoms and by combinations (an mm read once is
    # folded into the combination that reads it)
    reads: dict = {}
    atoms = [n for n in nodes if n.op == "call_function" and memo[n] is None]
    for read in [*(u for a in atoms for u in a.all_input_nodes), result]:
        for atom in memo.get(read) or {read: 1.0}:
            reads[atom] = reads.get(atom, 0) + 1

    def shape_of(atom) -> tuple | None:
        return _shape(result) if atom == "acc" else _shape(atom)

    def get(node) -> fx.Node:
        if node not in env:
            terms = memo.get(node)
            env[node] = new.node_copy(node, get) if terms is None else combine(list(terms.items()), None)
        return env[node]

    def folded_mm(t: tuple) -> bool:  # a matrix product read only by this combination
        return t[0] != "acc" and t[0].target is _aten.mm.default and reads.get(t[0]) == 1

    def folded_mul(t: tuple) -> bool:  # an elementwise product read only by this combination
        a = t[0]
        return a != "acc" and a.target is _aten.mul.Tensor and reads.get(a) == 1 and _both_nodes(a)

    def folded_slice(t: tuple) -> bool:  # a value placed in a slice of zeros, read only here
        return t[0] != "acc" and _slice_of(t[0]) is not None and reads.get(t[0]) == 1

    def accumulate(terms: list, into: fx.Node, base: fx.Node | None = None) -> fx.Node:
        """``out = acc + Σ c·atom`` (``acc`` is ``base`` when given) with ``out`` possibly
        ``acc`` itself: the first operation reads ``acc`` and writes ``out`` (an elementwise sum
        or an ``addmm``, both safe with ``out`` aliasing ``acc``), every later one adds into
        ``out`` in place, so no intermediate of the state's size is made (a block step of 10 at
        b=64, S=64: 3.1 against 2.4 ms with the sum made first and added to ``acc`` after); a
        value placed in a slice of zeros is accumulated into that slice of ``out`` last.
        """
        node = env["acc"] if base is None else base
        rest = [t for t in terms if t[0] != "acc"]
        slices = [t for t in rest if folded_slice(t)]
        rest = [t for t in rest if t not in slices]
        if not rest and not slices:  # the linear part cancels: out = acc
            return new.call_function(torch.mul, (node, 1.0), {"out": into})
        if not rest:  # every term goes into a slice: out holds acc first
            node = new.call_function(_holding, (node, into))
        mms = [t for t in rest if folded_mm(t)]
        muls = [t for t in rest if folded_mul(t)]
        others = [t for t in rest if t not in mms and t not in muls]
        for a, c in others[:1]:
            node = new.call_function(torch.add, (node, get(a)), {"alpha": c, "out": into})
        for a, c in mms:
            m1, m2 = (get(x) for x in a.args)
            node = new.call_function(torch.addmm, (node, m1, m2), {"alpha": c, "out": into})
        for a, c in muls:
            m1, m2 = (get(x) for x in a.args)
            node = new.call_function(torch.addcmul, (node, m1, m2), {"value": c, "out": into})
        for a, c in others[1:]:
            node = new.call_function(torch.add, (node, get(a)), {"alpha": c, "out": into})
        for a, c in slices:  # out[..., start:end] += c x, x's own terms folded into the slice
            x = a.args[0]
            bounds = cast(tuple, _slice_of(a))  # the dimension from the end: also a block's
            view = new.call_function(torch.narrow, (node, *bounds))
            inner = [(atom, c * ci) for atom, ci in (memo.get(x) or {x: 1.0}).items()]
            accumulate([*inner, ("acc", 1.0)], view, base=view)
        return node

    def combine(terms: list, into: fx.Node | None) -> fx.Node:
        terms = [(a, c) for a, c in terms if c != 0.0]
        if not terms:
            raise ValueError("a combination that cancels")
        if into is not None and any(a == "acc" for a, _ in terms):
            return accumulate(terms, into)
        last: dict[str, Any] = {} if into is None else {"out": into}
        every = into is not None  # no acc here (see accumulate): every operation may write out

        def out_if(final: bool) -> dict[str, Any]:
            return last if final or every else {}

        node = None
        mms = [t for t in terms if folded_mm(t)]
        mm = mms[0] if mms else None
        base = None
        if mm is not None:
            fits = [t for t in terms if t is not mm and shape_of(t[0]) == _shape(mm[0])]
            base = next((t for t in fits if t not in mms), fits[0] if fits else None)  # not an mm
        if mm is not None and base is not None:
            terms = [t for t in terms if t is not mm and t is not base]
            m1, m2 = (get(x) for x in mm[0].args)
            kw: dict[str, Any] = {"beta": base[1], "alpha": mm[1], **out_if(not terms)}
            node = new.call_function(torch.addmm, (get(base[0]), m1, m2), kw)
            # the other matrix products of the sum, each one more addmm onto it
            more = [t for t in terms if t in mms]
            terms = [t for t in terms if t not in mms]
            for i, (a, c) in enumerate(more):
                kw = {"alpha": c, **out_if(not terms and i == len(more) - 1)}
                node = new.call_function(torch.addmm, (node, *(get(x) for x in a.args)), kw)
        else:
            lead = next((t for t in terms if t[1] == 1.0), terms[0])
            terms = [t for t in terms if t is not lead]
            node = get(lead[0])
            if lead[1] != 1.0 or (not terms and into is not None):
                node = new.call_function(torch.mul, (node, lead[1]), out_if(not terms))
        for i, (a, c) in enumerate(terms):
            kw = {"alpha": c, **out_if(i == len(terms) - 1)}
            node = new.call_function(torch.add, (node, get(a)), kw)
        return node

    terms = list((memo[result] or {result: 1.0}).items())
    new.output(combine([*terms, ("acc", 1.0)] if acc else terms, out))
    return fx.GraphModule(gm, new)


def _mm_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for ``a [..., m]`` (rows in any leading dimensions) and ``b [m, n]``."""
    if a.dim() == 2:
        return torch.mm(a, b)
    return torch.mm(a.reshape(-1, a.shape[-1]), b).view(*a.shape[:-1], b.shape[-1])


def _addmm_rows(
    base: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    beta: Any = 1,
    alpha: Any = 1,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``beta base + alpha a @ b`` for ``a [..., m]`` as :func:`_mm_rows`, written into ``out``
    when given (``out`` may be ``base``); one ``addmm`` when ``out`` is a view of rows.
    """
    if a.dim() == 2:
        kw = {} if out is None else {"out": out}
        return torch.addmm(base, a, b, beta=beta, alpha=alpha, **kw)
    shape = (*a.shape[:-1], b.shape[-1])
    flat_a = a.reshape(-1, a.shape[-1])
    if out is not None and out.is_contiguous():  # rows that merge: in place, out may be base
        flat_out = out.view(-1, shape[-1])
        flat_base = flat_out if base is out else base.expand(shape).reshape(-1, shape[-1])
        torch.addmm(flat_base, flat_a, b, beta=beta, alpha=alpha, out=flat_out)
        return out
    flat_base = base.expand(shape).reshape(-1, shape[-1])
    if out is not None:  # through a new tensor
        return out.copy_(torch.addmm(flat_base, flat_a, b, beta=beta, alpha=alpha).view(shape))
    return torch.addmm(flat_base, flat_a, b, beta=beta, alpha=alpha).view(shape)


_ROW_FORMS: dict[Any, Callable[..., torch.Tensor]] = {_aten.mm.default: _mm_rows, torch.addmm: _addmm_rows}


# operations with a dimension argument: (position of the dimension(s), extra rank of the
# result over the input's: unsqueeze counts a dimension more)
_DIM_ARGS: dict[Any, tuple[int, int]] = {
    **dict.fromkeys(
        (
            _aten.cat.default,
            _aten.slice.Tensor,
            _aten.select.int,
            _aten.sum.dim_IntList,
            _aten.mean.dim,
            _aten.squeeze.dim,
            _aten._softmax.default,
            _aten._log_softmax.default,
        ),
        (1, 0),
    ),
    **dict.fromkeys(
        (
            _aten.split.Tensor,
            _aten.split_with_sizes.default,
            _aten._softmax_backward_data.default,
            _aten._log_softmax_backward_data.default,
        ),
        (2, 0),
    ),
    _aten.unsqueeze.default: (1, 1),
}


def _from_the_end(node: fx.Node) -> tuple:
    """``node``'s arguments with its dimensions counted from the end (so that they name the
    same dimensions of a block with leading dimensions added).
    """
    pos, extra = _DIM_ARGS[node.target]
    first = node.args[0]
    ref = first[0] if isinstance(first, (list, tuple)) else first
    known = _shape(ref) if isinstance(ref, fx.Node) else None
    if known is None or len(node.args) <= pos:
        raise ValueError("a dimension of unknown rank")
    rank = len(known[0]) + extra

    def neg(d):
        return d - rank if isinstance(d, int) and d >= 0 else d

    dim = node.args[pos]
    args = list(node.args)
    args[pos] = [neg(d) for d in dim] if isinstance(dim, (list, tuple)) else neg(dim)
    return tuple(args)


def _row_by_row(node: fx.Node) -> bool:
    """Whether ``node`` acts on every row alone once its dimension arguments count from the end:
    the folded sums, matrix products, the operations of :data:`_DIM_ARGS` and elementwise ones.
    Anything else (``roll``, ``flip``, ``cumsum``, a reshape, a reduction over everything) may mix
    the rows of a block or name its first dimension.
    """
    target = node.target
    if (
        target in (torch.add, torch.mul, torch.addcmul, operator.getitem, torch.narrow, _holding)
        or target in _ROW_FORMS
        or target in _DIM_ARGS
    ):
        return True
    return target in _ELEMENTWISE or torch.Tag.pointwise in getattr(target, "tags", ())


def rows_batched(gm: fx.GraphModule) -> fx.GraphModule:
    """The same map with its matrix products taking rows in any leading dimensions, so that a
    form traced for one vector ``[b, S]`` runs a block ``[b, k, S]`` (its residuals ``[b, ·]``
    given as ``[b, 1, ·]``, :meth:`_Split.shaped`) as it is: the folded sums stay folded and
    every matrix product is one product over ``b·k`` rows; dimension arguments are counted from
    the end. Only for maps whose every operation on the vector acts row by row
    (:func:`_row_by_row`; else a ``ValueError``); the caller checks the result on a block too.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    moving = {n for n in gm.graph.nodes if n.op == "placeholder" and n.name in ("vector", "acc", "out")}
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a in moving for a in node.all_input_nodes):
            moving.add(node)
            if not _row_by_row(node):
                raise ValueError(f"{node.target} may not act row by row")
        new = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and node.target in _ROW_FORMS:
            new.target = _ROW_FORMS[node.target]
        if node.op == "call_function" and node.target in _DIM_ARGS:
            new.args = fx.node.map_arg(_from_the_end(node), lambda n: env[n])
        env[node] = new
    return fx.GraphModule(gm, graph)


class _Split:
    """One traced linear map ``a ↦ L(params, s, u) a``: its residual and linear parts
    (``vectors_in``: how many of the last inputs make up ``a``; the map may have several outputs).
    """

    def __init__(self, gm: fx.GraphModule, vectors_in: int = 1, rows_in: int = 2):
        graph = _any_strides(gm).graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        vectors = inputs[len(inputs) - vectors_in :]
        _derivatives_as_factors(graph, vectors)
        _factors_merged(graph, vectors)
        # the inputs with a dimension of rows (the state and the input of a step: the ``rows_in``
        # before the vectors), and so the residuals made from them
        from_rows = _linear_nodes(graph, inputs[max(0, len(inputs) - vectors_in - rows_in) : -vectors_in])
        output = next(n for n in graph.nodes if n.op == "output")
        flat_out = output.args[0]
        results = list(flat_out) if isinstance(flat_out, (list, tuple)) else [flat_out]
        linear = _linear_nodes(graph, vectors)
        if any(not isinstance(r, fx.Node) or r not in linear for r in results):
            raise ValueError("an output that does not depend on the vector")
        needed = [
            n
            for n in graph.nodes
            if n not in linear and n.op != "output" and any(u in linear or u is output for u in n.users)
        ]

        residual_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in graph.nodes:
            if node not in linear and node.op != "output":
                env[node] = residual_graph.node_copy(node, lambda n: env[n])
        residual_graph.output(tuple(env[n] for n in needed))
        self.row_residuals = tuple(n in from_rows for n in needed)

        linear_graph = fx.Graph()
        lenv = {n: linear_graph.placeholder(f"r{i}") for i, n in enumerate(needed)}
        for i, v in enumerate(vectors):
            lenv[v] = linear_graph.placeholder("vector" if vectors_in == 1 else f"vector{i}")
        for old, placeholder in lenv.items():
            placeholder.meta = dict(old.meta)  # shapes and dtypes, read by :func:`accumulating`
        for node in graph.nodes:
            if node in linear and node not in vectors:
                lenv[node] = linear_graph.node_copy(node, lambda n: lenv[n])
        single = not isinstance(flat_out, (list, tuple))
        linear_graph.output(lenv[results[0]] if single else tuple(lenv[r] for r in results))

        if _writes_into_inputs(residual_graph) or _writes_into_inputs(linear_graph):
            raise ValueError("a traced step writes into its inputs")
        # plain bound methods: nn.Module.__call__'s hooks cost more than the small steps
        self.residuals: Callable[..., tuple] = fx.GraphModule(gm, residual_graph).forward
        linear_gm = fx.GraphModule(gm, linear_graph)
        self.apply: Callable[..., torch.Tensor] = linear_gm.forward
        self.owner, self.linear_graph = gm, linear_graph  # for other forms of the same map
        self.blocks: dict[int, Callable[..., torch.Tensor] | None] = {}
        # ``out = acc + L v`` with the linear combinations folded (checked by trace_step)
        self.into: Callable[..., torch.Tensor] = self.plain_into
        self._folded: fx.GraphModule | None = None
        self._rows_into: dict[int, Callable[..., torch.Tensor] | None] = {}
        if single and vectors_in == 1:
            try:
                self._folded = accumulating(linear_gm)
                self.into = self._folded.forward
            except Exception:  # something the folding does not know: the plain sum
                pass

    def plain_into(self, *args: torch.Tensor) -> torch.Tensor:
        """``out = acc + L v`` for ``(residuals..., v, acc, out)``, unfolded."""
        return torch.add(args[-2], self.apply(*args[:-2]), out=args[-1])

    def shaped(self, residuals: tuple) -> tuple:
        """``residuals`` as the row forms (:meth:`rows_into`) take them: those with a dimension of
        rows get a singleton after it, for the ``k`` vectors of a row (views).
        """
        return tuple(
            r.unsqueeze(1) if rows and isinstance(r, torch.Tensor) and r.dim() >= 1 else r
            for r, rows in zip(residuals, self.row_residuals)
        )

    def rows_into(self, residuals: tuple, k: int) -> Callable[..., torch.Tensor] | None:
        """``out = acc + L v`` for blocks ``v, acc, out [b, k, S]`` (the ``k`` vectors of a row
        side by side) by the folded form of one vector with its matrix products over ``b·k`` rows
        (:func:`rows_batched`), taking the residuals :meth:`shaped`; checked once per ``k``
        against :attr:`apply` column by column (with ``out`` aliasing ``acc``, as the
        recurrences use it); None when there is no folded form or the check fails.
        """
        if k not in self._rows_into:
            self._rows_into[k] = None
            if self._folded is None or self.into == self.plain_into:  # folding refused by the check
                return None
            val = next(n for n in self.linear_graph.nodes if n.name == "vector").meta["val"]
            kw: dict[str, Any] = {"dtype": val.dtype, "device": val.device}
            gen = torch.Generator(device=val.device).manual_seed(2)
            shape = (val.shape[0], k, *val.shape[1:])
            vec = torch.randn(shape, generator=gen, **kw)
            acc = torch.randn(shape, generator=gen, **kw)
            # at the step's residuals and at random ones of the same shapes (a residual that
            # happens to vanish at that step, e.g. from a zero start, would hide a wrong term)
            drawn = tuple(
                torch.randn(r.shape, generator=gen, **kw)
                if isinstance(r, torch.Tensor) and r.is_floating_point()
                else r
                for r in residuals
            )
            try:
                fn = rows_batched(self._folded).forward

                def agrees(res: tuple) -> bool:  # fresh out, and out aliasing acc
                    want = torch.stack([acc[:, j] + self.apply(*res, vec[:, j]) for j in range(k)], 1)
                    with warnings.catch_warnings():  # e.g. an out= of the wrong shape, resized
                        warnings.simplefilter("ignore")
                        got = [
                            fn(*self.shaped(res), vec, acc.clone(), torch.empty_like(acc)),
                            fn(*self.shaped(res), vec, *[acc.clone()] * 2),
                        ]
                    return all(same_to_rounding(g, want, float(vec.abs().max())) for g in got)

                if agrees(residuals) and agrees(drawn):
                    self._rows_into[k] = fn
            except Exception:  # a shape written into the map, or an operation not row by row
                pass
        return self._rows_into[k]

    def block(self, residuals: tuple, vectors: torch.Tensor) -> Callable[..., torch.Tensor] | None:
        """The linear part for ``k`` vectors ``[k, ...]`` at once (traced once per ``k`` under
        ``vmap``, with the same residuals), checked against :attr:`apply` column by column;
        None if it fails. Its output carries the ``k`` first.
        """
        k = vectors.shape[0]
        if k not in self.blocks:
            self.blocks[k] = None
            vmapped = torch.func.vmap(self.apply, in_dims=(None,) * len(residuals) + (0,))

            def batched(*args: torch.Tensor) -> torch.Tensor:  # a signature make_fx can read
                return vmapped(*args)

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    gm = _any_strides(
                        make_fx(batched, tracing_mode="fake", _allow_non_fake_inputs=True)(
                            *residuals, vectors
                        )
                    )
                if _writes_into_inputs(gm.graph):
                    return None
                got = gm.forward(*residuals, vectors)
                want = torch.stack([self.apply(*residuals, col) for col in vectors])
            except Exception:  # the columns one by one through autograd's graphs instead
                return None
            if same_to_rounding(got, want, float(vectors.abs().max())):
                self.blocks[k] = gm.forward
        return self.blocks[k]


def same_to_rounding(got: torch.Tensor, want: torch.Tensor, scale: float) -> bool:
    """Whether ``got`` is ``want`` up to rounding: within ``1000 eps`` of ``max |want| + scale``
    (``scale`` the size of what made them: the vector of a product, or 1).
    """
    if got.shape != want.shape:
        return False
    bound = 1e3 * torch.finfo(want.dtype).eps * (float(want.abs().max()) + scale)
    return float((got - want).abs().max()) <= bound


def _close(got: torch.Tensor, want: torch.Tensor, vec: torch.Tensor) -> bool:
    """The same product to rounding, on the scale of the result and the vector."""
    return same_to_rounding(got, want, float(vec.abs().max()))


class StepForms(NamedTuple):
    """A cell's step products accumulating into an output (:meth:`StepTrace.into`)."""

    vjp: Callable[..., torch.Tensor]
    jvp: Callable[..., torch.Tensor]
    shaped: bool  # whether they take each step's residuals as StepTrace.shaped gives them


class StepTrace:
    """``Aᵀ λ`` and ``A δ`` of a cell at any state of one shape, as traced linear parts.

    Use :meth:`residuals` once per step of a trajectory, then :meth:`vjp` / :meth:`jvp` per
    product with that step's residuals.
    """

    def __init__(self, vjp: _Split, jvp: _Split, state: torch.Tensor):
        self._vjp, self._jvp = vjp, jvp
        self._state = (tuple(state.shape), state.dtype, state.device)

    def residuals(self, params: Sequence[torch.Tensor], s: torch.Tensor, u: torch.Tensor) -> tuple:
        """What the linear parts need at state ``s`` and input ``u``: ``(vjp's, jvp's)``."""
        return self._vjp.residuals(*params, s, u), self._jvp.residuals(*params, s, u)

    def vjp(self, residuals: tuple, lam: torch.Tensor) -> torch.Tensor:
        """``Aᵀ λ`` for ``λ [b, S]``."""
        return self._vjp.apply(*residuals[0], lam)

    def jvp(self, residuals: tuple, delta: torch.Tensor) -> torch.Tensor:
        """``A δ`` for ``δ [b, S]``."""
        return self._jvp.apply(*residuals[1], delta)

    def into(self, k: int, residuals: tuple) -> StepForms | None:
        """``(vjp, jvp, shaped)`` accumulating into an output: ``f(res, x, acc, out)`` writes
        ``acc + Aᵀ x`` (or ``acc + A x``) into ``out`` and returns it (``out`` may be ``acc``);
        for one vector ``[b, S]``, for blocks ``[b, k, S]`` (the folded forms over ``b·k`` rows,
        which take each step's residuals as :meth:`shaped` gives them: ``shaped`` True; else the
        forms of :meth:`blocks`), or None. ``residuals`` (one step's) serve the checks.
        """
        if k == 1:
            v, j = self._vjp.into, self._jvp.into
            return StepForms(
                lambda res, x, acc, out: v(*res[0], x, acc, out),
                lambda res, x, acc, out: j(*res[1], x, acc, out),
                False,
            )
        v_rows, j_rows = self._vjp.rows_into(residuals[0], k), self._jvp.rows_into(residuals[1], k)
        if v_rows is not None and j_rows is not None:  # folded, products over b·k rows
            return StepForms(
                lambda res, x, acc, out: v_rows(*res[0], x, acc, out),
                lambda res, x, acc, out: j_rows(*res[1], x, acc, out),
                True,
            )
        products = self.blocks(residuals, k)
        if products is None:
            return None
        vb, jb = products  # on [k, b, S]
        return StepForms(
            lambda res, x, acc, out: torch.add(acc, vb(res, x.transpose(0, 1)).transpose(0, 1), out=out),
            lambda res, x, acc, out: torch.add(acc, jb(res, x.transpose(0, 1)).transpose(0, 1), out=out),
            False,
        )

    def shaped(self, residuals: tuple) -> tuple:
        """One step's ``(vjp's, jvp's)`` residuals for the row forms of blocks (:meth:`into`)."""
        return self._vjp.shaped(residuals[0]), self._jvp.shaped(residuals[1])

    def blocks(self, residuals: tuple, k: int) -> tuple[Callable, Callable] | None:
        """``(vjp, jvp)`` for blocks ``[k, b, S]`` with the same residuals (traced on first use
        with ``residuals`` of one step as the example), or None when they cannot be traced.
        """
        if k == 1:
            return self.vjp, self.jvp
        shape, dtype, device = self._state
        gen = torch.Generator(device=device).manual_seed(1)
        example = torch.randn(k, *shape, generator=gen, dtype=dtype, device=device)
        v = self._vjp.block(residuals[0], example)
        j = self._jvp.block(residuals[1], example)
        if v is None or j is None:
            return None
        return (lambda res, L: v(*res[0], L)), (lambda res, D: j(*res[1], D))


def _step_products(cell: Callable, names: Sequence[str], count: int):
    """``(at, vjp, jvp)``: the cell at ``(params..., s, u)`` as a function of the state, and its
    VJP and VJP-of-VJP in the state as functions of ``(params..., s, u, vector)``.
    """

    def at(flat: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        p = dict(zip(names, flat[:count]))
        return lambda x: cell(p, x, flat[count + 1])

    def vjp(*flat: torch.Tensor) -> torch.Tensor:
        return torch.func.vjp(at(flat), flat[count])[1](flat[-1])[0]

    def jvp(*flat: torch.Tensor) -> torch.Tensor:  # the VJP of the VJP in the cotangent
        zero = torch.zeros_like(flat[count])
        return torch.func.vjp(lambda a: vjp(*flat[:-1], a), zero)[1](flat[-1])[0]

    return at, vjp, jvp


def trace_step(
    cell: Callable, names: Sequence[str], params: Sequence[torch.Tensor], s: torch.Tensor, u: torch.Tensor
) -> StepTrace | None:
    """Trace ``cell(params_by_name, s, u)``'s state Jacobian products at ``s``'s shape, and
    check them against autograd at ``(s, u)`` (:func:`check_step`); None when the cell cannot
    be traced or the traced products disagree.
    """
    _, vjp, jvp = _step_products(cell, names, len(params))
    example = (*params, s, u, torch.zeros_like(s))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trace = StepTrace(
                _Split(make_fx(vjp, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)),
                _Split(make_fx(jvp, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)),
                s,
            )
    except Exception:  # any failure to trace: the autograd graphs stay
        return None
    return trace if check_step(trace, cell, names, params, s, u) else None


def check_step(
    trace: StepTrace,
    cell: Callable,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    s: torch.Tensor,
    u: torch.Tensor,
) -> bool:
    """Whether ``trace``'s products agree with autograd's on ``cell`` at ``(s, u)``; the folded
    accumulating forms that do not agree with the plain ones are replaced by them.
    """
    at, _, _ = _step_products(cell, names, len(params))
    gen = torch.Generator(device=s.device).manual_seed(0)
    vec = torch.randn(s.shape, generator=gen, dtype=s.dtype, device=s.device)
    try:
        res = trace.residuals(params, s, u)
        got = (trace.vjp(res, vec), trace.jvp(res, vec))
        with torch.enable_grad():  # autograd's products: Aᵀ vec, and A vec as the VJP of the VJP
            x = s.detach().requires_grad_(True)
            y = at((*params, s, u))(x)
            w = torch.zeros_like(y, requires_grad=True)
            (back,) = torch.autograd.grad(y, x, w, create_graph=True)
            (want_jvp,) = torch.autograd.grad(back, w, vec, retain_graph=True)
            (want_vjp,) = torch.autograd.grad(y, x, vec)
    except Exception:  # a trace that does not replay here, or a cell autograd cannot take
        return False
    if not (_close(got[0], want_vjp, vec) and _close(got[1], want_jvp, vec)):
        return False
    acc = torch.randn(s.shape, generator=gen, dtype=s.dtype, device=s.device)
    for split, res_i, plain in ((trace._vjp, res[0], got[0]), (trace._jvp, res[1], got[1])):
        try:  # the folded accumulating form (into a new tensor, and into acc), else the plain sum
            folded = split.into(*res_i, vec, acc, torch.empty_like(acc))
            inplace = acc.clone()
            split.into(*res_i, vec, inplace, inplace)
            ok = _close(folded, acc + plain, vec) and _close(inplace, acc + plain, vec)
        except Exception:
            ok = False
        if not ok:
            split.into = split.plain_into
    return True


class DirectForm(NamedTuple):
    """The traced direct term of a cell at one shape: ``Cᵀ λ`` and ``C x`` as split graphs, and
    ``C x`` with its sums folded, written into a buffer (None: the plain graph, then a copy).
    """

    vjp: _Split
    jvp: _Split
    jvp_into: Callable[..., torch.Tensor] | None
    vjp_scaled_late: Callable[..., tuple] | None = None  # Cᵀ λ with its scalings moved to the outputs
    # per (direction, k): whether the graphs run a block of k in one pass (see DirectTrace)
    blocks: dict | None = None


class DirectTrace:
    """The direct term of a cell over all ``b·T`` rows at once (``C x`` and ``Cᵀ λ``, with
    ``C = ∂F/∂θ`` at the stored states), as traced linear parts with their residuals evaluated
    once: the straight-line counterpart of recording the cell's autograd graph over all rows and
    taking ``C x`` as the VJP of its VJP. A block of ``k`` vectors runs the same graphs once
    with the ``k`` vectors of a row side by side (:mod:`lanczos_ntk.operators._block_direct`;
    rows ``[b·T, k, S]``), checked once per ``k`` against the vectors one by one; where that
    form fails, one vector at a time.
    """

    def __init__(self, form: DirectForm, args: tuple, residuals: tuple | None = None):
        self._form = form
        self._res = residuals or (form.vjp.residuals(*args), form.jvp.residuals(*args))
        self._side_by_side: dict = {}  # residuals put together for the block products (run_block)

    def vjp(self, lam: torch.Tensor) -> tuple:
        """``Cᵀ λ`` for ``λ [b·T, S]``: one tensor per differentiated parameter."""
        fn = self._form.vjp_scaled_late or self._form.vjp.apply
        out = fn(*self._res[0], lam)
        return out if isinstance(out, tuple) else (out,)

    def jvp(self, tangents: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """``C x`` for the tangents of the differentiated parameters: ``[b·T, S]``, written
        into ``out`` when given.
        """
        into = self._form.jvp_into
        if out is not None and into is not None:
            return into(*self._res[1], *tangents, out)
        got = self._form.jvp.apply(*self._res[1], *tangents)
        return got if out is None else out.copy_(got)

    def block_jvp(self, tangents: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
        """``C X`` for the tangents of ``k`` vectors (``[k, ...]`` each) into ``out``
        ``[b·T, k, S]`` in one pass; False (``out`` unspecified) where the block form is refused.
        """
        if not self.block_ready("jvp", out):
            return False
        self._run_jvp(tangents, out)
        return True

    def block_vjp(self, lam: torch.Tensor) -> tuple:
        """``Cᵀ Λ`` for ``Λ [b·T, k, S]`` in one pass: ``[k, ...]`` per parameter (after
        :meth:`block_ready` said yes).
        """
        return self._run_vjp(lam)

    def _run_jvp(self, tangents: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        k = out.shape[1]
        blocks = [Block(t, rows=False) for t in tangents]
        into = self._form.jvp_into
        if into is not None:
            run_block(_module(into), (*self._res[1], *blocks, Block(out, rows=True)), k, self._side_by_side)
        else:
            got = run_block(_module(self._form.jvp.apply), (*self._res[1], *blocks), k, self._side_by_side)
            out.copy_(got.as_rows())

    def _run_vjp(self, lam: torch.Tensor) -> tuple:
        fn = self._form.vjp_scaled_late or self._form.vjp.apply
        got = run_block(_module(fn), (*self._res[0], Block(lam, rows=True)), lam.shape[1], self._side_by_side)
        got = got if isinstance(got, tuple) else (got,)
        return tuple(g.front() for g in got)

    def block_ready(self, side: str, like: torch.Tensor) -> bool:
        """Whether the block form of ``side`` (``"jvp"``, ``"vjp"``) works for rows like
        ``like`` (``[b·T, k, S]``, only its shape read): tried once per form and ``k`` on random
        vectors against the vectors one by one (to rounding).
        """
        k = like.shape[1]
        known = self._form.blocks
        if known is None:
            return False
        if (side, k) not in known:
            known[side, k] = False
            gen = torch.Generator(device=like.device).manual_seed(3)
            kw: dict[str, Any] = {"dtype": like.dtype, "device": like.device}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if side == "jvp":  # the tangents' shapes, as traced
                        graph = self._form.jvp.linear_graph
                        shapes = [n.meta["val"].shape for n in graph.nodes if n.name.startswith("vector")]
                        tang = [torch.randn(k, *sh, generator=gen, **kw) for sh in shapes]
                        rows = torch.empty_like(like)
                        self._run_jvp(tang, rows)
                        each = torch.stack([self.jvp([t[j] for t in tang]) for j in range(k)], 1)
                        known[side, k] = same_to_rounding(rows, each, 1.0)
                    else:
                        lam = torch.randn(like.shape, generator=gen, **kw)
                        grads = self._run_vjp(lam)
                        ones = [torch.stack(g) for g in zip(*(self.vjp(lam[:, j]) for j in range(k)))]
                        known[side, k] = len(grads) == len(ones) and all(
                            same_to_rounding(g, w, float(lam.abs().max())) for g, w in zip(grads, ones)
                        )
            except Exception:  # an operation the block form does not know: vector by vector
                known[side, k] = False
        return known[side, k]


def _module(fn: Callable) -> fx.GraphModule:
    """The graph module behind a traced form's bound ``forward``."""
    return getattr(fn, "__self__")  # noqa: B009 -- a bound method's owner


def _direct_products(cell: Callable, names: Sequence[str], count: int, moving: Sequence[str]):
    """``(vjp, jvp)`` of the direct term as functions of ``(params..., s, u, vectors...)``."""

    def vjp(*flat: torch.Tensor) -> tuple:
        p = dict(zip(names, flat[:count]))
        x, v = flat[count], flat[count + 1]

        def f(*theta: torch.Tensor) -> torch.Tensor:
            return cell({**p, **dict(zip(moving, theta))}, x, v)

        return torch.func.vjp(f, *(p[n] for n in moving))[1](flat[-1])

    def jvp(*flat: torch.Tensor) -> torch.Tensor:  # the VJP of the VJP in the cotangent
        head, tangents = flat[: count + 2], flat[count + 2 :]
        zero = torch.zeros_like(flat[count])
        return torch.func.vjp(lambda a: vjp(*head, a), zero)[1](tuple(tangents))[0]

    return vjp, jvp


def trace_direct(
    cell: Callable,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    moving: Sequence[str],
    s: torch.Tensor,
    u: torch.Tensor,
) -> DirectForm | None:
    """Trace the direct term of ``cell(params_by_name, s, u)`` in the parameters ``moving`` at
    the shapes of the rows ``s, u`` (all trials and steps), and check it against autograd at
    these values (:func:`check_direct`); None when it cannot be traced or disagrees. Make a
    :class:`DirectTrace` of the result for the values of a trajectory.
    """
    vjp, jvp = _direct_products(cell, names, len(params), moving)
    by_name = dict(zip(names, params))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lam = torch.zeros_like(s)
            tangents = [torch.zeros_like(by_name[n]) for n in moving]
            v = _Split(make_fx(vjp, tracing_mode="fake", _allow_non_fake_inputs=True)(*params, s, u, lam))
            j = _Split(
                make_fx(jvp, tracing_mode="fake", _allow_non_fake_inputs=True)(*params, s, u, *tangents),
                vectors_in=len(moving),
            )
        try:
            into = accumulating(fx.GraphModule(j.owner, j.linear_graph), acc=False).forward
        except Exception:  # something the folding does not know: the plain graph
            into = None
        try:  # Cᵀ λ scales the M-sized λ by the step's constants: scale the gradients instead
            late = fx.GraphModule(v.owner, _scales_pushed_down(v.linear_graph)).forward
        except Exception:
            late = None
    except Exception:  # the recorded graph stays
        return None
    return check_direct(DirectForm(v, j, into, late, {}), cell, names, params, moving, s, u)


CHECK_ROWS = 4096  # rows of the direct term that check_direct compares with autograd's


def check_direct(
    form: DirectForm,
    cell: Callable,
    names: Sequence[str],
    params: Sequence[torch.Tensor],
    moving: Sequence[str],
    s: torch.Tensor,
    u: torch.Tensor,
) -> DirectForm | None:
    """``form`` if its products agree with autograd's on ``cell`` over the rows ``s, u`` (its
    folded ``C x`` dropped when that alone disagrees), else None. Autograd's side runs on at
    most :data:`CHECK_ROWS` of the rows: its double backward over all ``b·T`` rows cost 0.1 s
    of a module's first operator at 3.3M states.
    """
    by_name = dict(zip(names, params))
    gen = torch.Generator(device=s.device).manual_seed(0)
    # the reference on CHECK_ROWS rows drawn at random (spread over times and trials): the
    # traced parts run over all rows, with λ zero on the others, so each result is compared in full
    rows = s.shape[0]
    pick = (
        slice(None)
        if rows <= CHECK_ROWS
        else torch.randperm(rows, generator=gen, device=s.device)[:CHECK_ROWS]
    )
    lam = torch.zeros_like(s)
    lam[pick] = torch.randn(lam[pick].shape, generator=gen, dtype=s.dtype, device=s.device)
    tangents = [torch.randn(by_name[n].shape, generator=gen, dtype=s.dtype, device=s.device) for n in moving]
    try:
        traced = DirectTrace(form, (*params, s, u))  # the residuals once, for every check below
        plain = DirectTrace(form._replace(jvp_into=None, vjp_scaled_late=None), (), traced._res)
        got_vjp, got_jvp = plain.vjp(lam), plain.jvp(tangents)
        with torch.enable_grad():  # autograd's products at the same point, on those rows
            theta = [by_name[n].detach().requires_grad_(True) for n in moving]
            y = cell({**by_name, **dict(zip(moving, theta))}, s[pick], u[pick])
            w = torch.zeros_like(y, requires_grad=True)
            back = torch.autograd.grad(y, theta, w, create_graph=True)
            (want_jvp,) = torch.autograd.grad(back, w, tangents, retain_graph=True)
            want_vjp = torch.autograd.grad(y, theta, lam[pick])
        scale = torch.tensor(max(float(t.abs().max()) for t in tangents))
        ok = _close(got_jvp[pick], want_jvp, scale) and all(
            _close(g, w_, lam) for g, w_ in zip(got_vjp, want_vjp)
        )
    except Exception:  # a trace that does not replay here
        return None
    if not ok:
        return None
    if form.jvp_into is not None:
        try:
            folded = traced.jvp(tangents, torch.empty_like(got_jvp))
            same = _close(folded, got_jvp, scale)
        except Exception:
            same = False
        if not same:
            form = form._replace(jvp_into=None)
    if form.vjp_scaled_late is not None:
        try:
            late = traced.vjp(lam)
            same = len(late) == len(got_vjp) and all(_close(a, b, lam) for a, b in zip(late, got_vjp))
        except Exception:
            same = False
        if not same:
            form = form._replace(vjp_scaled_late=None)
    return form
