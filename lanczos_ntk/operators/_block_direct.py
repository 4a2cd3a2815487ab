"""The direct term of a cell for a block of vectors in one pass.

The direct term ``C x`` (parameter tangents -> all ``b·T`` rows) and its transpose ``Cᵀ λ`` are
traced for one vector (:class:`~lanczos_ntk.operators._traced_step.DirectTrace`). For a block of
``k`` vectors, running the traced code once per vector repeats every pass over the rows ``k``
times with ``k`` small matrix products, and lays each vector's rows out apart from the others'.
Here the same traced graph is run once on the whole block, with every value that depends on the
vectors carried in one of two layouts:

- *rows*: a value whose first dimension is the rows (``[R, ...]`` for one vector) is held as
  ``[R, k, ...]``: the ``k`` vectors of a row side by side, so that a matrix product with a
  parameter-sized matrix is one product over ``R·k`` rows (``[R·k, m] @ [m, p]``) or with the
  ``k`` vectors' matrices side by side (``[R, m] @ [m, k·p]``), and a product over the rows
  (``λᵀ r``, a weight gradient) is one ``[m, R] @ [R, k·S]``, transposed after;
- *front*: anything else (a parameter tangent, a gradient) as ``[k, ...]``.

Values that do not depend on the vectors (the residuals) broadcast against these: one with a
rows dimension gets a singleton for ``k``. Products that read the same rows share one pass
(:class:`_Fusions`): the residuals side by side with a column of ones, as the closed forms'
``[h, u, 1]``. Operations outside the small set below raise ``NotImplementedError``; the caller
checks the block form once per ``k`` against the vectors one by one and falls back to them on
any failure.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import fx

__all__ = ["ELEMENTWISE", "Block", "run_block"]

_aten = torch.ops.aten

# elementwise operations without torch's ``pointwise`` tag
ELEMENTWISE = {
    getattr(_aten, name).default
    for name in (
        "softplus_backward",
        "gelu_backward",
        "elu_backward",
        "leaky_relu_backward",
        "hardtanh_backward",
        "silu_backward",
        "log_sigmoid_backward",
    )
    if hasattr(_aten, name)
}


class Block:
    """A value for ``k`` vectors: ``t`` holds them at dimension 1 (``rows``) or 0."""

    __slots__ = ("rows", "t")

    def __init__(self, t: torch.Tensor, rows: bool):
        self.t, self.rows = t, rows

    @property
    def rank(self) -> int:
        """The rank of one vector's value."""
        return self.t.dim() - 1

    def front(self) -> torch.Tensor:
        """``[k, ...]`` (a view)."""
        return self.t.movedim(1, 0) if self.rows else self.t

    def as_rows(self) -> torch.Tensor:
        """``[R, k, ...]`` (a view; the value must have a first dimension)."""
        if self.rank < 1:
            raise NotImplementedError("a scalar value in the rows layout")
        return self.t if self.rows else self.t.movedim(0, 1)


def _phys(dim: int, rank: int, rows: bool) -> int:
    """The dimension of a block's tensor holding one vector's dimension ``dim``."""
    d = dim + rank if dim < 0 else dim
    if not 0 <= d < rank:
        raise NotImplementedError("a dimension out of range")
    return 0 if rows and d == 0 else d + 1


def _fixed(r: Any, rank: int) -> Any:
    """A residual (not a block) to broadcast against a rows block of one-vector rank ``rank``:
    with a rows dimension (same rank), a singleton for the ``k`` vectors after it.
    """
    if isinstance(r, torch.Tensor) and r.dim() == rank and rank >= 1:
        return r.unsqueeze(1)
    if isinstance(r, torch.Tensor) and r.dim() > rank:
        raise NotImplementedError("a residual of higher rank than the vectors' value")
    return r


def _align(args: Sequence[Any], rank: int | None = None) -> tuple[list[Any], bool]:
    """Elementwise operands as tensors that broadcast like one vector's (:func:`_layout`) to a
    result of one-vector rank ``rank`` (default: the blocks' highest): in the rows layout when a
    block is, or a residual has a rows dimension. Returns the operands and whether the result is
    in rows.
    """
    blocks = [a for a in args if isinstance(a, Block)]
    rank = max(b.rank for b in blocks) if rank is None else rank
    rows = any(b.rows and b.rank == rank for b in blocks) or any(
        isinstance(a, torch.Tensor) and a.dim() == rank and rank >= 1 for a in args
    )
    return [_layout(a, rows, rank) for a in args], rows


def _mm_parts(a: Any, b: Any, k: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...], bool]:
    """``a @ b``, one of the two a block, as one matrix product: ``(L, R, shape, rows)`` with
    the block's result ``(L @ R).view(shape)`` in the rows layout or not.
    """
    if isinstance(a, Block) and isinstance(b, Block):
        raise NotImplementedError("a product of two values of the vectors")
    if isinstance(b, Block):  # [n, m] @ [k, m, p]: the k matrices side by side
        f = b.front()
        m, p = f.shape[1], f.shape[2]
        return a, f.permute(1, 0, 2).reshape(m, k * p), (a.shape[0], k, p), True
    if a.rows:  # [R, k, m] as R·k rows
        t = a.t
        return t.reshape(-1, t.shape[-1]), b, (t.shape[0], k, b.shape[1]), True
    f = a.t  # front [k, n, m]
    return f.reshape(-1, f.shape[-1]), b, (k, f.shape[1], b.shape[1]), False


def _mm(a: Any, b: Any, k: int) -> Block:
    """``a @ b``, one of the two a block. A transposed rows block (``λᵀ r``: ``[R, k, n]`` seen
    as ``[k, n, R]``, the product over the rows, a weight gradient) goes as one
    ``[p, R] @ [R, k·n]``, transposed after: with the few columns of ``r`` as the short side
    (``[k·n, R] @ [R, p]`` ran at 60% of the speed, b=64, T=50, S=64, k=10).
    """
    if isinstance(a, Block) and not a.rows and not isinstance(b, Block) and a.rank == 2:
        rows = a.t.permute(2, 0, 1)
        if rows.is_contiguous():
            flat = rows.reshape(rows.shape[0], -1)
            return Block(torch.mm(b.T, flat).T.view(k, a.t.shape[1], b.shape[1]), False)
    lhs, rhs, shape, rows_out = _mm_parts(a, b, k)
    return Block(torch.mm(lhs, rhs).view(shape), rows_out)


def _layout(x: Any, rows: bool, rank: int) -> Any:
    """``x`` (a block, a residual or a number) as a tensor of the given layout for a block of
    one-vector rank ``rank``.
    """
    if not isinstance(x, Block):
        return _fixed(x, rank) if rows else x
    if x.rank > rank:
        raise NotImplementedError("a block of higher rank")
    t = x.front()
    if rows and x.rank == rank:
        return x.as_rows()
    pad = rank - x.rank - (1 if rows else 0)
    return t.reshape(t.shape[0], *([1] * pad), *t.shape[1:])


def _shape_of(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise NotImplementedError("a value of unknown shape")
    return tuple(val.shape)


def _pointwise(target: Any) -> bool:
    return target in ELEMENTWISE or torch.Tag.pointwise in getattr(target, "tags", ())


def _is(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


class _Fusions:
    """The products of a graph that share a pass, found once per graph.

    - *over the rows*: ``t(x) @ r_i`` for several residuals ``r_i`` and ``x.sum(0)`` (a column
      of ones), all of the same value ``x``: one ``[Σ m_i + 1, R] @ [R, k·S]``, as
      ``[h, u, 1]ᵀ λ`` gives every weight's and bias's gradient in the closed forms
      (``over``: ``x -> [(member, residual or None for the sum)]``, ``member``: its ``x``);
    - *into the rows*: a chain ``addmm(... addmm(base, r_1, P_1) ..., r_n, P_n)`` of
      ``residual @ tangent`` products, each read only by the next, a broadcast bias as its base:
      one ``[R, Σ m_i + 1] @ [Σ m_i + 1, k·S]`` (``chains``: last link -> its links in order;
      ``inner``: the links computed with their last).
    """

    def __init__(self, graph: fx.Graph):
        def residual(n: Any) -> bool:
            return isinstance(n, fx.Node) and n.op == "placeholder"

        def matrix(n: Any) -> bool:  # a value known to be a matrix for one vector
            val = n.meta.get("val") if isinstance(n, fx.Node) else None
            return isinstance(val, torch.Tensor) and val.dim() == 2

        over: dict[fx.Node, list] = {}
        for node in graph.nodes:
            if _is(node, _aten.mm.default) and _is(node.args[0], _aten.t.default) and residual(node.args[1]):
                over.setdefault(node.args[0].args[0], []).append((node, node.args[1]))
            elif (
                _is(node, _aten.sum.dim_IntList) and list(node.args[1]) in ([0], [-2]) and len(node.args) <= 3
            ):
                if matrix(node.args[0]):
                    over.setdefault(node.args[0], []).append((node, None))
        # a group shares a pass: two members or more, one of them a product with a residual
        self.over = {x: it for x, it in over.items() if len(it) > 1 and any(r is not None for _, r in it)}
        self.member = {m: x for x, it in self.over.items() for m, _ in it}

        def is_link(n: Any) -> bool:  # residual @ a value of the vectors
            return (
                _is(n, torch.addmm, _aten.addmm.default) and residual(n.args[1]) and not residual(n.args[2])
            )

        nxt: dict[fx.Node, fx.Node] = {}  # a link -> the next (which adds to it, scaled by 1)
        for node in graph.nodes:
            base = node.args[0] if is_link(node) else None
            if isinstance(base, fx.Node) and is_link(base) and len(base.users) == 1:
                if node.kwargs.get("beta", 1) == 1:
                    nxt[base] = node
        self.chains: dict[fx.Node, list[fx.Node]] = {}
        for first in [n for n in graph.nodes if n in nxt and n not in nxt.values()]:
            links = [first]
            while links[-1] in nxt:
                links.append(nxt[links[-1]])
            self.chains[links[-1]] = links
        self.inner = {n for links in self.chains.values() for n in links[:-1]}

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _Fusions:
        """Found once per graph module, kept with it."""
        found = getattr(gm, "_block_fusions", None)
        if found is None:
            found = cls(gm.graph)
            setattr(gm, "_block_fusions", found)  # noqa: B010 -- kept with the graph it describes
        return found


def run_block(gm: fx.GraphModule, args: Sequence[Any], k: int, cache: dict | None = None) -> Any:
    """Run ``gm`` with some of its inputs :class:`Block` s of ``k`` vectors; the values that
    depend on them come out as blocks (outputs too; nested in tuples as they are). ``cache``
    keeps the residuals put side by side for the fused products (:class:`_Fusions`) from one
    call to the next (the residuals must then be the same tensors).
    """
    env: dict[fx.Node, Any] = {}
    it = iter(args)
    fused = _Fusions.of(gm)
    cache = {} if cache is None else cache

    def val(a: Any) -> Any:
        return fx.node.map_arg(a, lambda n: env[n])

    for node in gm.graph.nodes:
        if node in env:  # computed with the product it shares a pass with
            continue
        if node.op == "placeholder":
            env[node] = next(it)
            continue
        if node.op == "output":
            return val(node.args[0])
        if node.op != "call_function":
            raise NotImplementedError(f"{node.op} in a traced graph")
        if node in fused.inner:  # a link of a chain: with its last
            continue
        if node in fused.chains:
            env[node] = _chain(fused.chains[node], env, k, cache)
            continue
        a = tuple(val(node.args))
        kw = dict(val(node.kwargs))
        flat = list(a) + [x for x in kw.values()]
        if not any(isinstance(x, Block) for x in flat) and not any(
            isinstance(x, (list, tuple)) and any(isinstance(y, Block) for y in x) for x in flat
        ):
            env[node] = node.target(*a, **kw)  # a value of the residuals alone
            continue
        x = fused.member.get(node)
        if x is not None and isinstance(env[x], Block) and env[x].rows:
            env.update(_products_over_rows(env[x], fused.over[x], env, k, cache))
            continue
        env[node] = _apply(node, a, kw, k)
    raise NotImplementedError("a graph without an output")


def _side_by_side(parts: list[torch.Tensor], ones: bool, cache: dict) -> torch.Tensor:
    """``[r_1, ..., r_n (, 1)]`` as columns of one matrix, kept in ``cache``."""
    key = (tuple(id(p) for p in parts), ones)
    if key not in cache:
        cols = [p.reshape(p.shape[0], -1) for p in parts]
        if ones:
            cols.append(parts[0].new_ones(parts[0].shape[0], 1))
        cache[key] = (torch.cat(cols, 1), parts)  # the parts kept alive: their ids stay theirs
    return cache[key][0]


def _products_over_rows(x: Block, items: list, env: dict, k: int, cache: dict) -> dict:
    """Every member of a group over the rows of ``x`` (see :class:`_Fusions`) from one product."""
    residuals = [env[r] for _, r in items if r is not None]
    ones = any(r is None for _, r in items)
    R = x.t.shape[0]
    if x.rank != 2 or any(
        not isinstance(r, torch.Tensor) or r.dim() != 2 or r.shape[0] != R for r in residuals
    ):
        raise NotImplementedError("products over the rows with a residual that is not [rows, m]")
    L = _side_by_side(residuals, ones, cache)
    flat = x.t.reshape(R, -1)  # [R, k·S]
    S = flat.shape[1] // k
    got = torch.mm(L.T, flat)  # [Σ m (+1), k·S]
    out, at = {}, 0
    for node, r in items:
        if r is None:
            part = got[-1].view(k, S)
            keep = bool(node.args[2]) if len(node.args) > 2 else bool(node.kwargs.get("keepdim", False))
            out[node] = Block(part.unsqueeze(1) if keep else part, False)
        else:
            m = env[r].shape[1]
            out[node] = Block(got[at : at + m].T.view(k, S, m), False)
            at += m
    return out


def _chain(links: list[fx.Node], env: dict, k: int, cache: dict) -> Block:
    """A chain of ``addmm`` s (see :class:`_Fusions`) as one product into its last link's output."""
    first, last = links[0], links[-1]
    residuals, rhs = [], []
    for link in links:
        r, p = env[link.args[1]], env[link.args[2]]
        if not isinstance(r, torch.Tensor) or not isinstance(p, Block) or r.dim() != 2:
            raise NotImplementedError("a chain of products that are not residual @ tangent")
        f = p.front()
        alpha = cast(float, link.kwargs.get("alpha", 1))
        rhs.append(f.permute(1, 0, 2).reshape(f.shape[1], k * f.shape[2]) * alpha)
        residuals.append(r)
    base = env[first.args[0]]
    beta = cast(float, first.kwargs.get("beta", 1))
    R, width = residuals[0].shape[0], rhs[0].shape[1]
    # a row broadcast over the rows (a bias): one more row of M, against a column of ones
    bias = _is(first.args[0], _aten.expand.default) and isinstance(base, Block) and base.rows
    bias = bias and base.t.stride(0) == 0
    if bias:
        rhs.append(base.t[:1].reshape(1, width) * beta)
    L = _side_by_side(residuals, bool(bias), cache)
    M = torch.cat(rhs, 0)
    out = env[last.kwargs["out"]] if "out" in last.kwargs else None
    dest = None
    if out is not None:
        dest = out.as_rows()
        if not dest.is_contiguous() or tuple(dest.shape) != (R, k, width // k):
            raise NotImplementedError("an output of another layout")
    flat_out = None if dest is None else dest.view(R, width)
    if bias:
        got = torch.mm(L, M, out=flat_out) if flat_out is not None else torch.mm(L, M)
    else:
        b = _layout(base, True, 2).expand(R, k, width // k).reshape(R, width)
        got = torch.addmm(b, L, M, beta=beta, **({"out": flat_out} if flat_out is not None else {}))
    return out if out is not None else Block(got.view(R, k, width // k), True)


def _apply(node: fx.Node, a: tuple, kw: dict, k: int) -> Block:  # noqa: C901 -- one rule per operation
    target = cast(Callable[..., Any], node.target)
    out = kw.pop("out", None)
    if target in (torch.addmm, _aten.addmm.default, _aten.mm.default):
        if target is _aten.mm.default:
            return _mm(a[0], a[1], k)
        m1, m2 = a[1:]
        lhs, rhs, shape, rows = _mm_parts(m1, m2, k)
        base = _layout(a[0], rows, len(shape) - 1).expand(shape).reshape(lhs.shape[0], rhs.shape[1])
        extra = {n: kw.pop(n) for n in ("beta", "alpha") if n in kw}
        if out is None:
            return Block(torch.addmm(base, lhs, rhs, **extra).view(shape), rows)
        dest = out.as_rows() if rows else out.front()
        if not dest.is_contiguous() or tuple(dest.shape) != shape:
            raise NotImplementedError("an output of another layout")
        torch.addmm(base, lhs, rhs, **extra, out=dest.view(lhs.shape[0], rhs.shape[1]))
        return out
    if target in (_aten.alias.default, _aten.clone.default, _aten.detach.default):
        return Block(a[0].t if target is not _aten.clone.default else a[0].t.clone(), a[0].rows)
    if target in (_aten.unsqueeze.default, _aten.squeeze.dim, _aten.unsqueeze_.default, _aten.squeeze_.dim):
        x, dim = a[0], a[1]
        grow = target in (_aten.unsqueeze.default, _aten.unsqueeze_.default)
        d = dim + (x.rank + 1 if grow else x.rank) if dim < 0 else dim
        if x.rows and d > 0:  # the rows stay first
            return Block(x.t.unsqueeze(d + 1) if grow else x.t.squeeze(d + 1), True)
        f = x.front()
        return Block(f.unsqueeze(d + 1) if grow else f.squeeze(d + 1), False)
    if target is _aten.permute.default:
        x = a[0]
        dims = [_phys(d, x.rank, False) for d in a[1]]
        return Block(x.front().permute(0, *dims), False)
    if target in (_aten.t.default, _aten.transpose.int):
        (x,) = a[:1]
        if target is _aten.t.default and x.rank == 1:
            return x
        d0, d1 = (0, 1) if target is _aten.t.default else a[1:3]
        return Block(x.front().transpose(_phys(d0, x.rank, False), _phys(d1, x.rank, False)), False)
    if target in (_aten.reshape.default, _aten.view.default, _aten.expand.default):
        x = a[0]
        shape = _shape_of(node)
        if target is _aten.expand.default:
            t = x.front()
            t = t.reshape(t.shape[0], *([1] * (len(shape) - x.rank)), *t.shape[1:])
            if len(shape) == 0:
                return Block(t, False)
            moved = t.movedim(0, 1)
            return Block(moved.expand(shape[0], k, *shape[1:]), True)
        if x.rows and len(shape) >= 1 and shape[0] == x.t.shape[0]:
            return Block(x.t.reshape(shape[0], k, *shape[1:]), True)
        return Block(x.front().reshape(k, *shape), False)
    if target is _aten.sum.default:  # over everything but the k vectors
        x = a[0]
        return Block(x.t.sum([d for d in range(x.t.dim()) if d != (1 if x.rows else 0)]), False)
    if target is _aten.sum.dim_IntList:
        x = a[0]
        named = a[1] if len(a) > 1 else kw.get("dim")
        keep = bool(a[2]) if len(a) > 2 else bool(kw.get("keepdim", False))
        dims = [named] if isinstance(named, int) else list(named or [])
        if not dims:  # a sum over everything would mix the vectors
            raise NotImplementedError("a sum over every dimension")
        phys = [_phys(d, x.rank, x.rows) for d in dims]
        t = x.t.sum(phys, keepdim=keep)
        rows_dropped = x.rows and 0 in phys and not keep
        return Block(t, x.rows and not rows_dropped)
    if target in (_aten.slice.Tensor, _aten.select.int):
        x = a[0]
        dim = a[1] if len(a) > 1 else 0
        p = _phys(dim, x.rank, x.rows)
        if target is _aten.select.int:
            t = x.t.select(p, a[2])
            return Block(t, x.rows and p != 0)
        start = a[2] if len(a) > 2 else None
        end = a[3] if len(a) > 3 else None
        step = a[4] if len(a) > 4 else 1
        idx = [slice(None)] * x.t.dim()
        idx[p] = slice(start, end, step)
        return Block(x.t[tuple(idx)], x.rows)
    if target in (_aten.slice_backward.default, _aten.select_backward.default):
        g = a[0]
        sizes = list(a[1])
        rank = len(sizes)
        dim = a[2]
        rows = g.rows and (target is _aten.slice_backward.default or _phys(dim, rank, True) != 0)
        p = _phys(dim, rank, rows)
        phys_sizes = [sizes[0], k, *sizes[1:]] if rows else [k, *sizes]
        zeros = g.t.new_zeros(phys_sizes)
        where: list[Any] = [slice(None)] * len(phys_sizes)
        if target is _aten.select_backward.default:
            where[p] = a[3]
        else:
            where[p] = slice(a[3], a[4], a[5] if len(a) > 5 else 1)
        zeros[tuple(where)] = g.as_rows() if rows else g.front()
        return Block(zeros, rows)
    if target is _aten.cat.default:
        parts = a[0]
        dim = a[1] if len(a) > 1 else 0
        blocks = [p for p in parts if isinstance(p, Block)]
        if len(blocks) != len(parts):
            raise NotImplementedError("a concatenation with fixed values")
        rows = all(p.rows for p in blocks)
        rank = blocks[0].rank
        return Block(torch.cat([p.t if rows else p.front() for p in blocks], _phys(dim, rank, rows)), rows)
    if target in (operator.neg, _aten.neg.default):
        return Block(-a[0].t, a[0].rows)
    if target in (torch.add, torch.mul, torch.addcmul) or _pointwise(target):
        alpha = kw.pop("alpha", None)
        value = kw.pop("value", None)
        ops, rows = _align(a, len(_shape_of(node)) if "val" in node.meta else None)
        if sum(isinstance(x, Block) for x in a) > 1 and target in (_aten.mul.Tensor, torch.mul):
            raise NotImplementedError("a product of two values of the vectors")
        extra = {} if alpha is None else {"alpha": alpha}
        if value is not None:
            extra["value"] = value
        if out is None:
            return Block(target(*ops, **extra, **kw), rows)
        dest = out.as_rows() if rows else out.front()
        target(*ops, **extra, **kw, out=dest)
        return out
    raise NotImplementedError(f"{target} on a block")
