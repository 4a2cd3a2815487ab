"""Product paths (closed form, cell, autograd) and the memory budget, against dense references."""

import pytest
import torch
from torch import nn

import lanczos_ntk as lnk
from lanczos_ntk import models
from lanczos_ntk.testing import assert_operator_close, dense_gram, dense_jacobian
from tests.helpers import gen, inputs

F64 = torch.float64


def seeded(cls, *args, **kwargs):
    """A torch module built after seeding the global generator (torch's init draws from it)."""
    torch.manual_seed(3)
    return cls(*args, **kwargs)


class _Iterates(nn.Module):
    """forward iterates ``step`` from zeros (``n`` states; 4 unless set)."""

    n = 4

    def forward(self, u):
        h = torch.zeros(u.shape[0], self.n, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            h = self.step(h, u[:, t])
            out.append(h)
        return torch.stack(out, 1)


class StepModule(_Iterates):
    """A user's module with a documented one-step method: forward iterates step from zeros."""

    def __init__(self, n=3, d=2, seed=5):
        super().__init__()
        g = gen(seed)
        self.A = nn.Parameter(0.6 * torch.randn(n, n, generator=g, dtype=F64))
        self.C = nn.Parameter(torch.randn(n, d, generator=g, dtype=F64))
        self.c = nn.Parameter(0.1 * torch.randn(n, generator=g, dtype=F64))
        self.register_buffer("leak", torch.tensor(0.7, dtype=F64))
        self.n = n

    def step(self, h, u):
        return self.leak * h + torch.sigmoid(h @ self.A.T + u @ self.C.T + self.c) * torch.tanh(h + 1)


class MismatchedStep(StepModule):
    """step is not what forward iterates: the cell must be refused."""

    def forward(self, u):
        return 1.5 * super().forward(u)


def check_products(K, J, full=True):
    X = torch.randn(J.shape[1], 4, generator=gen(2), dtype=F64)
    V = torch.randn(J.shape[0], 4, generator=gen(3), dtype=F64)
    for k in (1, 4):  # single vectors and blocks
        ref = J @ X[:, :k]
        assert torch.linalg.norm(K.jvp(X[:, :k]) - ref) <= 1e-11 * torch.linalg.norm(ref)
        ref = J.T @ V[:, :k]
        assert torch.linalg.norm(K.vjp(V[:, :k]) - ref) <= 1e-11 * torch.linalg.norm(ref)
    if not full:  # one block through K and G
        ref = J @ (J.T @ V)
        assert torch.linalg.norm(K.matmul(V) - ref) <= 1e-11 * torch.linalg.norm(ref)
        ref = J.T @ (J @ X)
        assert torch.linalg.norm(K.dual().matmul(X) - ref) <= 1e-11 * torch.linalg.norm(ref)
        return
    assert_operator_close(K, J @ J.T, rtol=1e-10)
    assert_operator_close(K.dual(), J.T @ J, rtol=1e-10)


@pytest.mark.parametrize("chunk_size, cache", [(None, None), (2, None), (1, False)])
def test_user_module_with_a_step_method_takes_the_cell_path(chunk_size, cache):
    model, u = StepModule(), inputs(B=5)
    K = lnk.StateNTK(model, u, chunk_size=chunk_size, cache=cache)
    assert K.plan.path == "cell" and K.plan.cell == "step"
    assert K.plan.cached == (cache is None)
    check_products(K, dense_jacobian(model, u))


def test_cell_path_through_the_public_grad_when_the_engine_call_is_unavailable(monkeypatch):
    """The cell path calls autograd's engine directly when it is usable on this torch; with
    that switched off it goes through ``torch.autograd.grad``: both agree with the dense truth."""
    from lanczos_ntk.operators import _dual_graph

    model, u = StepModule(), inputs(B=3)
    J = dense_jacobian(model, u)
    if _dual_graph._ENGINE_GRAD is not None:  # this torch takes the direct call
        check_products(lnk.StateNTK(model, u), J, full=False)
    monkeypatch.setattr(_dual_graph, "_ENGINE_GRAD", None)
    check_products(lnk.StateNTK(model, u), J, full=False)


def _linearization(K):
    K.engine._linearization(0)  # built by the first product otherwise
    return K.engine._lin[0]


class LayersStep(_Iterates):
    """A step built from torch layers: Linear, softplus, LayerNorm."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.rec, self.inp = nn.Linear(4, 4, dtype=F64), nn.Linear(2, 4, bias=False, dtype=F64)
        self.norm = nn.LayerNorm(4, dtype=F64)

    def step(self, h, u):
        return self.norm(nn.functional.softplus(self.rec(h)) + self.inp(u))


class PiecewiseStep(_Iterates):
    """A leaky, clipped step: where and clamp (their derivatives mask by the data)."""

    def __init__(self):
        super().__init__()
        g = gen(6)
        self.W = nn.Parameter(0.5 * torch.randn(4, 4, generator=g, dtype=F64))
        self.U = nn.Parameter(torch.randn(4, 2, generator=g, dtype=F64))

    def step(self, h, u):
        a = h @ self.W.T + u @ self.U.T
        return torch.where(a > 0, a, 0.1 * a).clamp(-3, 3) + 0.5 * h


class TorchCellStep(_Iterates):
    """A step that calls torch's GRUCell (whose kernels write into their own tensors)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.cell = nn.GRUCell(2, 4, dtype=F64)

    def step(self, h, u):
        return self.cell(u, h)


@pytest.mark.parametrize(
    "model",
    [
        StepModule,
        LayersStep,
        PiecewiseStep,
        TorchCellStep,
        lambda: models.GRU(3, 2, seed=3),
        lambda: models.DiagonalSSM(4, 2, seed=1),
        lambda: models.ContinuousNormalForm("hopf", mu=0.1, input_size=2),
    ],
)
def test_single_vectors_run_the_traced_state_jacobian(model):
    """Single vectors and blocks go through the cell's state Jacobian traced into straight-line
    code (blocks by the folded form over k·b rows, or the form traced under vmap), against the
    dense truth."""
    model, u = model(), inputs(B=4, T=5)
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "cell"
    trace = _linearization(K).traced()[0]
    check_products(K, dense_jacobian(model, u))
    for split in (trace._vjp, trace._jvp):
        assert split._rows_into.get(4) is not None or split.blocks.get(4) is not None
    assert _linearization(K)._steps is None  # no per-step autograd graphs were built


@pytest.mark.parametrize(
    "model",
    [
        StepModule,
        PiecewiseStep,
        TorchCellStep,
        lambda: models.GRU(3, 2, seed=3),
        lambda: models.DiagonalSSM(4, 2, seed=1),  # its halves (a cat) added into slices of out
    ],
)
def test_blocks_accumulate_through_the_folded_form_over_all_rows(model):
    """A block of k vectors runs the folded form of one vector with its matrix products over
    the k·b rows of a step (no vmap trace), against the dense truth. (LayersStep's LayerNorm
    backward has the row's shape written in: its blocks take the vmap trace, tested above.)"""
    model, u = model(), inputs(B=4, T=5)
    K = lnk.StateNTK(model, u)
    trace = _linearization(K).traced()[0]
    check_products(K, dense_jacobian(model, u), full=False)
    for split in (trace._vjp, trace._jvp):
        assert split._rows_into[4] is not None and 4 not in split.blocks


def test_rows_batched_refuses_a_map_with_its_shape_written_in():
    """A linear part that reshapes to the single vector's shape does not act row by row on a
    block: its row form is refused (blocks then take the vmap trace or the graphs), not run
    wrongly; the folded form of one vector stays."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import _Split

    W = torch.randn(3, 3, generator=gen(4), dtype=F64)

    def linear(r, v):  # flattens the state: fine for one vector, wrong for a block
        return (v.reshape(-1) * r.reshape(-1)).reshape(2, 3) @ W

    r = torch.randn(2, 3, generator=gen(5), dtype=F64)
    zero = torch.zeros(2, 3, dtype=F64)
    split = _Split(make_fx(linear, tracing_mode="fake", _allow_non_fake_inputs=True)(r, zero))
    res = split.residuals(r)
    assert split.into != split.plain_into  # folded for one vector
    assert split.rows_into(res, 4) is None
    v, acc = torch.randn(2, 3, generator=gen(6), dtype=F64), torch.randn(2, 3, generator=gen(7), dtype=F64)
    got = split.into(*res, v, acc, torch.empty(2, 3, dtype=F64))
    assert torch.allclose(got, acc + (v * r) @ W, rtol=1e-13)


class RingStep(_Iterates):
    """A tanh network plus a product with the state rolled along its units (``roll`` on dim 1:
    not row by row once a block adds a leading dimension)."""

    def __init__(self, n=5, d=2):
        super().__init__()
        g = gen(11)
        self.W = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=F64))
        self.U = nn.Parameter(torch.randn(n, d, generator=g, dtype=F64))
        self.n = n

    def step(self, h, u):
        return torch.tanh(h @ self.W.T + u @ self.U.T) + 0.3 * h * torch.roll(h, 1, dims=1)


def test_a_step_that_mixes_its_units_by_position_keeps_blocks_right():
    """``roll`` names a dimension that a block shifts: the row form is refused (the vmap trace
    serves) even where the step's residuals vanish at the state it is checked at (zero first
    inputs from a zero start), and blocks agree with the dense truth."""
    model = RingStep()
    u = 0.5 * torch.randn(4, 6, 2, generator=gen(0), dtype=F64)
    u[:, 0] = 0  # a delayed stimulus: the first states are zero
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    trace = _linearization(K).traced()[0]
    assert trace._vjp._rows_into[4] is None and trace._jvp._rows_into[4] is None


def test_rows_batched_matrix_products_write_into_rows_that_do_not_merge():
    """The row forms of mm/addmm on blocks ``[k, b, S]``: views of rows written in place, rows
    that do not merge (a time-major slice of ``[k, T, b, S]``) through a copy; both exact."""
    from lanczos_ntk.operators._traced_step import _addmm_rows, _mm_rows

    g = gen(7)
    a, W = torch.randn(3, 4, 5, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    base = torch.randn(3, 4, 2, generator=g, dtype=F64)
    want = 0.5 * base + 2.0 * torch.einsum("kbs,sn->kbn", a, W)
    assert torch.allclose(_mm_rows(a, W), torch.einsum("kbs,sn->kbn", a, W), rtol=1e-13)
    out = torch.empty(3, 4, 2, dtype=F64)
    assert _addmm_rows(base, a, W, beta=0.5, alpha=2.0, out=out) is out
    assert torch.allclose(out, want, rtol=1e-13)
    buf = torch.zeros(3, 6, 4, 2, dtype=F64)  # [k, T, b, S]: the step-2 slice does not merge
    strided = buf[:, 2]
    strided.copy_(base)
    assert _addmm_rows(strided, a, W, beta=0.5, alpha=2.0, out=strided) is strided
    assert torch.allclose(buf[:, 2], want, rtol=1e-13) and buf[:, 1].abs().max() == 0


def _folded(split) -> bool:
    return split.into != split.plain_into


@pytest.mark.parametrize(
    "model", [StepModule, LayersStep, PiecewiseStep, TorchCellStep, lambda: models.GRU(3, 2, seed=3)]
)
def test_single_vectors_accumulate_through_the_folded_linear_parts(model):
    """Single vectors run ``acc + A x`` with the linear combinations of the traced parts folded
    (the products above are against the dense truth; here: the folded form is the one in use)."""
    model, u = model(), inputs(B=4, T=5)
    K = lnk.StateNTK(model, u)
    trace = _linearization(K).traced()[0]
    check_products(K, dense_jacobian(model, u), full=False)
    assert _folded(trace._vjp) and _folded(trace._jvp)


class EulerStep(_Iterates):
    """The Euler CTRNN as a user writes its step."""

    def __init__(self, n=4, d=2):
        super().__init__()
        g = gen(8)
        self.W = nn.Parameter(torch.randn(n, n, generator=g, dtype=F64) / n**0.5)
        self.B = nn.Parameter(torch.randn(n, d, generator=g, dtype=F64))
        self.n = n

    def step(self, h, u):
        return h + 0.1 * (-h + torch.tanh(h) @ self.W.T + u @ self.B.T)


def test_blocks_run_with_the_vectors_of_a_row_side_by_side():
    """A block's recurrences and direct term share one time-major buffer ``[T, b, k, S]``: the
    step's row forms take the residuals made from the state with a singleton for ``k`` and the
    weights as they are, told apart by what they are made from, not by their shapes (here
    ``b = S``, so a weight and a row of states have the same shape); no work buffer for a
    copy of the rows; against the dense truth."""
    model, u = EulerStep(n=4), inputs(B=4, T=5)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    lin = _linearization(K)
    trace, res = lin.traced()
    for split, r in ((trace._vjp, res[1][0]), (trace._jvp, res[1][1])):
        assert split._rows_into[4] is not None and 4 not in split.blocks
        flags = zip(split.row_residuals, r)
        square = [f for f, x in flags if isinstance(x, torch.Tensor) and x.dim() == 2]
        assert set(square) == {True, False}  # tanh'(h) (rows) and the weight, both [4, 4]
        for (f, x), y in zip(zip(split.row_residuals, r), split.shaped(r)):
            assert y.shape == ((x.shape[0], 1, *x.shape[1:]) if f and x.dim() else x.shape)
    assert not any(name.startswith("cell.rows") for name in K.engine._scratch.sizes)


def test_folding_leaves_the_euler_step_a_few_operations():
    """``δ + 0.1 (-δ + (tanh'(h) δ) Wᵀ)`` plus the accumulated term: one elementwise product, one
    addmm and one add (the trace has six operations and the recurrence adds a seventh), the
    sums written into the output one after the other."""
    model, u = EulerStep(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    trace = _linearization(K).traced()[0]
    ops = [n for n in trace._jvp.into.__self__.graph.nodes if n.op == "call_function"]
    assert len(ops) == 3 and any(n.target is torch.addmm for n in ops)
    assert len([n for n in trace._vjp.into.__self__.graph.nodes if n.op == "call_function"]) <= 5
    for split in (trace._jvp, trace._vjp):  # the sums accumulate into out: no state-sized temporary
        sums = [n for n in split.into.__self__.graph.nodes if n.target in (torch.add, torch.addmm)]
        assert sums and all("out" in n.kwargs for n in sums)


def test_accumulating_on_hand_made_linear_maps():
    """``out = acc + f(r, v)`` from the folded graph, against ``f`` itself, into a fresh tensor
    and into ``acc``; a cancelling combination that another operation reads is refused (the
    plain sum is used then)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import accumulating

    def mixed(r, W, v):
        a = v @ W  # folded into an addmm with the other terms
        return 0.5 * (a - 3.0 * v) + (r * v) / 4.0 - (-v)

    def shared_mm(r, W, v):
        a = v @ W  # read twice: stays one mm
        return a * r + (a - v) / 2.0

    def broadcast(r, W, v):
        return (v + r[:1]) - r[:1] + v.sum(0, keepdim=True)  # sums of other shapes: kept

    r, W, v, acc = (torch.randn(3, 3, generator=gen(i), dtype=F64) for i in range(4))
    for f in (mixed, shared_mm, broadcast):
        gm = make_fx(f)(r, W, v)
        folded = accumulating(gm)
        want = acc + f(r, W, v)
        torch.testing.assert_close(folded(r, W, v, acc, torch.empty_like(acc)), want)
        into = acc.clone()
        torch.testing.assert_close(folded(r, W, v, into, into), want)
        torch.testing.assert_close(into, want)
    ops = [n.target for n in accumulating(make_fx(mixed)(r, W, v)).graph.nodes if n.op == "call_function"]
    # v's multiple onto acc, then addmm and addcmul (r*v) into out
    assert ops == [torch.add, torch.addmm, torch.addcmul]
    gm = make_fx(lambda r, W, v: (v + v) - 2.0 * v)(r, W, v)  # all but acc cancels
    torch.testing.assert_close(accumulating(gm)(r, W, v, acc, torch.empty_like(acc)), acc)
    with pytest.raises(ValueError, match="cancels"):  # a cancelling term read by an mm
        accumulating(make_fx(lambda r, W, v: ((v + v) - 2.0 * v) @ W + v)(r, W, v))


def test_values_placed_in_slices_accumulate_into_the_slices_of_out():
    """``slice_backward`` (a half of the state put back among zeros, as a ``cat``'s adjoint
    makes) in a sum: added into that slice of ``out`` with its own terms folded (``addcmul``
    into the slice), no state-sized zeros; with other terms, and alone (``out`` holding ``acc``
    first); against the plain map into a fresh ``out`` and into ``acc``; and on blocks
    ``[b, k, S]`` through the row form."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import _Split, accumulating, rows_batched

    def halves(r, v):  # a rotation of the two halves, as a complex diagonal state
        re, im = v[:, :3], v[:, 3:]
        return torch.cat([re * r[:, :3] - im * r[:, 3:], re * r[:, 3:] + im * r[:, :3]], 1)

    def adjoint_halves(W, r, v):
        return torch.func.vjp(lambda x: halves(r, x), v)[1](v)[0]

    def adjoint_with_mm(W, r, v):
        return torch.func.vjp(lambda x: halves(r, x) + x @ W - 0.5 * x, v)[1](v)[0]

    W = torch.randn(6, 6, generator=gen(9), dtype=F64)
    r, v, acc = (torch.randn(4, 6, generator=gen(i), dtype=F64) for i in range(3))
    for f in (adjoint_halves, adjoint_with_mm):
        gm = make_fx(f)(W, r, v)
        assert torch.ops.aten.slice_backward.default in [n.target for n in gm.graph.nodes]
        folded = accumulating(gm)
        kinds = [n.target for n in folded.graph.nodes if n.op == "call_function"]
        assert torch.ops.aten.slice_backward.default not in kinds and torch.narrow in kinds
        want = acc + f(W, r, v)
        torch.testing.assert_close(folded(W, r, v, acc, torch.empty_like(acc)), want, rtol=1e-13, atol=0)
        into = acc.clone()
        folded(W, r, v, into, into)
        torch.testing.assert_close(into, want, rtol=1e-13, atol=0)
        split = _Split(gm, rows_in=1)  # r has rows, W not
        res = split.residuals(W, r)
        fn = rows_batched(split._folded).forward
        V, A = (torch.randn(4, 3, 6, generator=gen(i), dtype=F64) for i in (5, 6))
        block = torch.stack([A[:, j] + split.apply(*res, V[:, j]) for j in range(3)], 1)
        torch.testing.assert_close(fn(*split.shaped(res), V, A.clone(), torch.empty_like(A)), block)
    alone = accumulating(make_fx(adjoint_halves)(W, r, v))
    kinds = [n.target for n in alone.graph.nodes if n.op == "call_function"]
    assert kinds[0].__name__ == "_holding" and kinds.count(torch.addcmul) == 4


def test_fixed_factors_of_a_product_become_one_residual():
    """``(v * r1) * r2`` (a gate times an activation's derivative, say) becomes ``v * (r1 * r2)``
    with ``r1 * r2`` a residual made once per step; a product ``v * r1`` read twice stays; the
    linear part agrees with the map; and a user's LSTM-like step (state ``[h, c]``) has fewer
    residuals and products that agree with the dense truth."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import _Split

    def chained(a, b, v):
        return (v * torch.tanh(a)) * torch.sigmoid(b) - v

    def longer(a, b, v):  # three fixed factors: merged link by link into one
        return ((v * torch.tanh(a)) * torch.sigmoid(b)) * a

    def shared(a, b, v):
        w = v * a
        return w * b + w

    a, b, v = (torch.randn(4, 5, generator=gen(i), dtype=F64) for i in range(3))
    for f, products in ((chained, 1), (longer, 1), (shared, 2)):
        split = _Split(make_fx(f)(a, b, v))
        res = split.residuals(a, b)
        muls = [n for n in split.linear_graph.nodes if n.target is torch.ops.aten.mul.Tensor]
        assert len(muls) == products
        torch.testing.assert_close(split.apply(*res, v), f(a, b, v), rtol=1e-13, atol=0)

    class LSTMStep(_Iterates):
        def __init__(self, n=3, d=2):
            super().__init__()
            g = gen(12)
            self.Wh = nn.Parameter(torch.randn(4 * n, n, generator=g, dtype=F64) / n**0.5)
            self.Wu = nn.Parameter(torch.randn(4 * n, d, generator=g, dtype=F64))
            self.n = 2 * n

        def step(self, s, u):
            h, c = s[:, : self.n // 2], s[:, self.n // 2 :]
            i, f, g, o = (h @ self.Wh.T + u @ self.Wu.T).chunk(4, 1)
            c2 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.cat([torch.sigmoid(o) * torch.tanh(c2), c2], 1)

    model, u = LSTMStep(), inputs(B=4, T=5)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    trace, res = _linearization(K).traced()
    assert len(res[1][0]) + len(res[1][1]) < 20  # 24 before the factors were merged


class MixedFactorsStep(StepModule):
    """Fixed factors of another dtype (float32 buffers in a float64 cell): not merged, since
    their product would be made in float32."""

    def __init__(self):
        super().__init__()
        self.register_buffer("g", torch.rand(3, generator=gen(3)).float() + 0.5)
        self.register_buffer("m", torch.rand(3, generator=gen(4)).float() + 0.5)

    def step(self, h, u):
        return (h * self.g) * self.m + 0.5 * torch.tanh(h @ self.A.T + u @ self.C.T)


class NegativeEndStep(StepModule):
    """Parts of the state sliced with negative ends (``h[:, :-1]``, ``h[:, -1:]``)."""

    def step(self, h, u):
        a, b = h[:, :-1], h[:, -1:]
        z = torch.tanh(h @ self.A.T + u @ self.C.T)
        return torch.cat([b * z[:, :1], a * z[:, 1:] - 0.5 * a], 1)


@pytest.mark.parametrize("model", [MixedFactorsStep, NegativeEndStep])
def test_folding_keeps_dtypes_and_takes_negative_slice_ends(model):
    """The traced step stays in use (no fallback to the step graphs) and its folded forms too,
    with a part of the state added into a slice given by a negative end; against dense."""
    model, u = model(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    trace, _ = _linearization(K).traced()
    assert _folded(trace._vjp) and _folded(trace._jvp)
    if isinstance(model, NegativeEndStep):
        kinds = {n.target for sp in (trace._vjp, trace._jvp) for n in sp.into.__self__.graph.nodes}
        assert torch.narrow in kinds


def test_multiples_by_numbers_move_past_homogeneous_operations():
    """``v + tanh'(y) ⊙ ((0.1 v) W) - 0.1 v`` (an Euler step's ``Aᵀ λ``): the 0.1 moves past the
    matrix product and ``tanh_backward`` into the sum, so no pass scales ``v`` alone."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import accumulating

    def adjoint(y, W, v):
        s = 0.1 * v
        return v + torch.ops.aten.tanh_backward(s @ W, y) - s

    g = gen(11)
    y, W, v, acc = (torch.randn(4, 4, generator=g, dtype=F64) for _ in range(4))
    folded = accumulating(make_fx(adjoint)(y, W, v))
    torch.testing.assert_close(folded(y, W, v, acc, torch.empty_like(acc)), acc + adjoint(y, W, v))
    ops = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert torch.mul not in ops and torch.ops.aten.mul.Tensor not in ops and len(ops) == 4


@pytest.mark.parametrize("kind", ["tanh", "sigmoid"])
def test_activation_derivatives_become_residual_factors(kind):
    """``Aᵀ λ = 0.9 λ + 0.1 φ'(y) ⊙ (λ W)`` with ``φ'`` through ``tanh_backward`` /
    ``sigmoid_backward``: the derivative ``1 - y²`` / ``y(1 - y)`` is a residual of the split
    (made once per step) and the accumulating form is ``add, mm, addcmul``; the products agree
    with the original map, into a fresh output and into ``acc``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import _Split

    backward = getattr(torch.ops.aten, f"{kind}_backward")
    act = getattr(torch, kind)

    def adjoint(h, W, v):
        return 0.9 * v + 0.1 * backward(v @ W, act(h))

    g = gen(12)
    h, W, v, acc = (torch.randn(5, 4, generator=g, dtype=F64) for _ in range(4))
    W = W[:4]
    split = _Split(make_fx(adjoint)(h, W, v))
    res = split.residuals(h, W)
    want = adjoint(h, W, v)
    deriv = 1 - act(h) ** 2 if kind == "tanh" else act(h) * (1 - act(h))
    assert any(r.shape == deriv.shape and torch.allclose(r, deriv) for r in res)
    assert not any(n.target is backward.default for n in split.linear_graph.nodes)
    torch.testing.assert_close(split.apply(*res, v), want)
    torch.testing.assert_close(split.into(*res, v, acc, torch.empty_like(acc)), acc + want)
    into = acc.clone()
    split.into(*res, v, into, into)
    torch.testing.assert_close(into, acc + want)
    ops = [n.target for n in split.into.__self__.graph.nodes if n.op == "call_function"]
    assert ops == [torch.add, torch.ops.aten.mm.default, torch.addcmul]


def test_two_matrix_products_and_a_bias_fold_into_two_addmms_without_acc():
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import accumulating

    def direct(a, x, W, U, b):  # the direct term of an Euler step: its tangents W, U, b
        return 0.1 * (a @ W.t() + x @ U.t() + b.reshape(1, -1).expand(a.shape[0], -1))

    g = gen(5)
    a, x = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 2, generator=g, dtype=F64)
    W, U, b = torch.randn(3, 3, dtype=F64), torch.randn(3, 2, dtype=F64), torch.randn(3, dtype=F64)
    folded = accumulating(make_fx(direct)(a, x, W, U, b), acc=False)
    out = torch.full((6, 3), float("nan"), dtype=F64)
    got = folded(a, x, W, U, b, out)
    torch.testing.assert_close(got, direct(a, x, W, U, b))
    torch.testing.assert_close(out, direct(a, x, W, U, b))
    ops = [n.target for n in folded.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.addmm) == 2 and torch.add not in ops and torch.mul not in ops


@pytest.fixture
def direct_now(monkeypatch):
    """The direct term traced from the first product on (not after DIRECT_TRACE_AFTER)."""
    from lanczos_ntk.operators import _cells

    monkeypatch.setattr(_cells, "DIRECT_TRACE_AFTER", 0)


@pytest.mark.parametrize("params", [None, ["W"], ["B", "W"]])
def test_the_direct_term_of_a_cell_is_traced(direct_now, params):
    """Single vectors and blocks take the direct term ``C x`` / ``Cᵀ λ`` over all rows from its
    traced form (``C x`` of one vector folded into a buffer), for all parameters or some;
    against the dense truth."""
    model, u = EulerStep(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u, params=params)
    lin = _linearization(K)
    check_products(K, dense_jacobian(model, u, params=params), full=False)
    assert lin.traced_direct() is not None
    form = next(v for key, v in lin.cell._traces.items() if key[0] == "direct")
    assert form.jvp_into is not None and form.vjp_scaled_late is not None
    # blocks of 4 through the same traced parts, vector by vector: no graph over all rows
    # recorded, no vmap trace of the direct term
    assert lin._direct_graph is None
    assert not form.jvp.blocks and not form.vjp.blocks


def test_the_direct_term_keeps_its_graph_when_not_traced(monkeypatch):
    from lanczos_ntk.operators import _cells

    monkeypatch.setattr(_cells, "trace_direct", lambda *args: None)
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    assert _linearization(K).traced_direct() is None


def test_a_traced_direct_term_that_disagrees_is_refused(monkeypatch, direct_now):
    from lanczos_ntk.operators import _traced_step

    real = _traced_step.DirectTrace.vjp
    monkeypatch.setattr(
        _traced_step.DirectTrace, "vjp", lambda self, lam: tuple(1.001 * g for g in real(self, lam))
    )
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert _linearization(K).traced_direct() is None
    monkeypatch.setattr(_traced_step.DirectTrace, "vjp", real)
    check_products(K, dense_jacobian(model, u), full=False)


@pytest.mark.parametrize("wrong", [False, True])
def test_the_direct_term_is_checked_on_rows_spread_over_times_and_trials(monkeypatch, direct_now, wrong):
    """check_direct compares with autograd on CHECK_ROWS rows drawn at random, the traced parts
    running over all of them: a right trace is taken (and agrees with the dense truth), one
    whose ``Cᵀ λ`` is off by 1% on one compared row is refused."""
    from lanczos_ntk.operators import _traced_step

    model, u = StepModule(), inputs(B=3)
    monkeypatch.setattr(_traced_step, "CHECK_ROWS", 4)  # of 3 trials x T steps
    seen = []
    if wrong:
        real = _traced_step.DirectTrace.vjp

        def vjp(self, lam):
            row = int(torch.nonzero(lam.abs().sum(1))[0])  # a compared row (λ is zero elsewhere)
            seen.append(int((lam.abs().sum(1) > 0).sum()))
            one = torch.zeros_like(lam)
            one[row] = lam[row]
            return tuple(g + 0.01 * e for g, e in zip(real(self, lam), real(self, one)))

        monkeypatch.setattr(_traced_step.DirectTrace, "vjp", vjp)
    K = lnk.StateNTK(model, u)
    traced = _linearization(K).traced_direct()
    if not wrong:
        assert traced is not None
        check_products(K, dense_jacobian(model, u), full=False)
    else:
        assert traced is None and seen[0] == 4  # four rows compared


def test_a_folded_form_that_disagrees_is_replaced_by_the_plain_sum(monkeypatch):
    from lanczos_ntk.operators import _traced_step

    real = _traced_step.accumulating

    def off(gm):
        folded = real(gm)
        return lambda *args: folded(*args).mul_(1.001)

    monkeypatch.setattr(_traced_step, "accumulating", off)
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    trace = _linearization(K).traced()[0]
    assert not _folded(trace._vjp) and not _folded(trace._jvp)
    check_products(K, dense_jacobian(model, u), full=False)


def test_blocks_through_the_step_graphs_when_their_trace_fails(monkeypatch):
    from lanczos_ntk.operators import _traced_step

    monkeypatch.setattr(_traced_step._Split, "block", lambda self, residuals, *vectors: None)
    monkeypatch.setattr(_traced_step._Split, "rows_into", lambda self, residuals, k: None)
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    assert _linearization(K).traced() is not None and _linearization(K)._steps is not None


class BranchingStep(StepModule):
    """A step that branches on its data: no trace may bake one branch in."""

    def step(self, h, u):
        nxt = super().step(h, u)
        return nxt if float(nxt.detach().abs().max()) < 1e3 else torch.zeros_like(nxt)


def test_a_step_that_branches_on_data_keeps_the_autograd_graphs():
    model, u = BranchingStep(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "cell" and _linearization(K).traced() is None
    check_products(K, dense_jacobian(model, u), full=False)


class SignBranchStep(StepModule):
    """A step whose branch depends on a sum over its rows: taken per step by the model, once
    for all steps if the cell ran over every row of the trajectory at once."""

    def step(self, h, u):
        if h.sum() > 0:
            return torch.tanh(h @ self.A.T + u @ self.C.T)
        return torch.sigmoid(h @ self.A.T - u @ self.C.T) - 0.5


class BatchMeanStep(StepModule):
    """A smooth step that reads the mean over the batch (its rows are not apart)."""

    def step(self, h, u):
        return super().step(h, u) - 0.5 * h.mean(0, keepdim=True)


def test_a_step_whose_rows_are_not_apart_takes_its_direct_term_step_by_step():
    """The direct term runs the cell over all b·T rows at once only when that gives the
    trajectory step by step; a branch on a sum over the rows (here over one trial's state, so
    over its time steps once all rows are together) does not, and goes step by step: against the
    dense truth (the all-rows direct term was 24% off)."""
    model = SignBranchStep()
    u = torch.randn(1, 4, 2, generator=gen(7), dtype=F64)
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "cell"
    check_products(K, dense_jacobian(model, u), full=False)
    lin = _linearization(K)
    assert not lin.rows_apart and lin.traced_direct() is None and lin._direct_graph is None
    plain = lnk.StateNTK(StepModule(), u)
    plain.matmul(torch.ones(plain.shape[0], 1, dtype=F64))
    assert _linearization(plain).rows_apart


@pytest.mark.parametrize("model", [SignBranchStep, BatchMeanStep])
def test_steps_that_couple_the_trials_are_right_whichever_path_takes_them(model):
    model, u = model(), torch.randn(3, 4, 2, generator=gen(7), dtype=F64)
    check_products(lnk.StateNTK(model, u), dense_jacobian(model, u), full=False)


class InPlaceStep(StepModule):
    """A step that writes in place into a tensor it made (as torch's own cells do inside)."""

    def step(self, h, u):
        nxt = super().step(h, u)
        return nxt.mul_(0.9)


def test_a_step_that_writes_in_place_into_its_own_tensors_is_traced():
    model, u = InPlaceStep(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert _linearization(K).traced() is not None
    check_products(K, dense_jacobian(model, u), full=False)


def test_traces_that_write_into_their_inputs_are_recognised():
    """Replayed per product, a write into an input would overwrite stored residuals or the
    caller's vector; writes into tensors made within the graph are harmless."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._traced_step import _writes_into_inputs

    def into_input(a, b):
        a.add_(b)
        return 2 * a

    def through_a_view(a, b):
        a.view(-1)[:2].mul_(b.view(-1)[:2])
        return a + b

    def into_own(a, b):
        c = a * 1.0
        c.add_(b)
        return c.t().contiguous().mul_(3.0)

    x, y = torch.randn(2, 3), torch.randn(2, 3)
    assert _writes_into_inputs(make_fx(into_input)(x.clone(), y).graph)
    assert _writes_into_inputs(make_fx(through_a_view)(x.clone(), y).graph)
    assert not _writes_into_inputs(make_fx(into_own)(x, y).graph)


def test_single_vectors_through_the_step_graphs_when_not_traced(monkeypatch):
    from lanczos_ntk.operators import _cells

    monkeypatch.setattr(_cells.Cell, "step_trace", lambda self, *args: None)
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert _linearization(K).traced() is None
    check_products(K, dense_jacobian(model, u), full=False)


def test_a_trace_that_disagrees_with_autograd_is_refused(monkeypatch):
    from lanczos_ntk.operators import _traced_step

    def off(self, res, d):
        return 1.001 * self._jvp.apply(*res[1], d)

    monkeypatch.setattr(_traced_step.StepTrace, "jvp", off)
    model, u = StepModule(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert _linearization(K).traced() is None
    check_products(K, dense_jacobian(model, u), full=False)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_generic_cell_path_with_outputs_a_part_of_the_state(monkeypatch, cls):
    """Torch's recurrent layers through the generic (traced) cell path instead of their closed
    form: the outputs are the last layer's hidden state, a part of the flat state."""
    from lanczos_ntk.operators import _cells

    plain = _cells._torch_rnn_cell

    def without_closed_form(model):
        cell = plain(model)
        cell.closed_form = cell.trial_bytes = None
        return cell

    monkeypatch.setattr(_cells, "_torch_rnn_cell", without_closed_form)
    model, u = seeded(cls, 2, 3, num_layers=2, batch_first=True, dtype=F64), inputs(B=3)
    K = lnk.StateNTK(model, u)
    lin = _linearization(K)
    assert lin.traced() is not None and not lin._whole
    check_products(K, dense_jacobian(model, u))


def test_a_step_that_does_not_reproduce_forward_is_not_used():
    model, u = MismatchedStep(), inputs()
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "autograd"
    check_products(K, dense_jacobian(model, u))
    with pytest.raises(ValueError, match="one-step cell"):
        lnk.StateNTK(model, u, jvp="cell")


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_torch_rnns_with_two_layers_and_initial_states(cls):
    torch.manual_seed(0)  # torch's own init draws from the global generator
    model = cls(2, 3, num_layers=2, batch_first=True, dtype=F64)
    u = inputs(B=4, T=5)
    h = torch.randn(2, 4, 3, generator=gen(4), dtype=F64)
    h0 = (h, torch.randn(2, 4, 3, generator=gen(5), dtype=F64)) if cls is nn.LSTM else h
    J = dense_jacobian(model, u, h0=h0)
    for cache in (None, False):
        K = lnk.StateNTK(model, u, h0=h0, chunk_size=3, cache=cache)
        # torch's cell equations have a closed-form linearisation: no state Jacobians stored
        assert K.plan.path == "cell" and "torch.nn" in K.plan.cell and "closed form" in K.plan.cell
        assert K.plan.cached == (cache is None)
        check_products(K, J)


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("span", [1, 2])
@pytest.mark.parametrize("layers", [1, 2])
def test_torch_rnns_in_blocks_of_steps(monkeypatch, cls, span, layers):
    """The parameter parts and the gate cotangents go through in blocks of steps (one step,
    or two, which do not divide ``T = 5``), the gradients summed over the blocks."""
    from lanczos_ntk.operators import _rnn_path

    model = seeded(cls, 2, 3, num_layers=layers, batch_first=True, dtype=F64)
    gates = _rnn_path._GATES[_rnn_path.rnn_kind(model)]
    monkeypatch.setattr(_rnn_path, "BLOCK_BYTES", span * 2 * gates * 3 * 8)  # b=2, H=3, float64
    monkeypatch.setattr(_rnn_path, "FUSED_VJP_MAX_STATES", 0)
    u = inputs(B=2, T=5)
    K = lnk.StateNTK(model, u)
    assert K.engine._linearization(0)._span(1, 8) == span
    check_products(K, dense_jacobian(model, u))


@pytest.mark.parametrize("cls, layers", [(nn.GRU, 1), (nn.GRU, 2), (nn.LSTM, 1), (nn.LSTM, 2), (nn.RNN, 2)])
def test_torch_rnn_adjoint_writes_into_its_input_only_when_consumed(monkeypatch, cls, layers):
    """The adjoint recurrence of torch's recurrent layers accumulates into a time-major copy of
    its input, and into the input itself when the caller gives it up (``consume``, as ``Jᵀ J X``
    does with ``J X``): an input already laid out time-major (where a copy would otherwise be a
    view) is left alone unless consumed, and both agree with the dense ``Jᵀ v``."""
    from lanczos_ntk.operators import _rnn_path

    monkeypatch.setattr(_rnn_path, "FUSED_VJP_MAX_STATES", 0)  # the LSTM's explicit recurrence
    model, u = seeded(cls, 2, 3, num_layers=layers, batch_first=True, dtype=F64), inputs(B=3, T=5)
    K = lnk.StateNTK(model, u)
    lin = K.engine._linearization(0)
    J = dense_jacobian(model, u)
    B, T, H = 3, 5, 3
    for k in (1, 3):
        time_major = torch.randn(T, B, k, H, generator=gen(k), dtype=F64)
        V = time_major.permute(2, 1, 0, 3)  # [k, b, T, H], a permuted view
        want = (J.T @ V.reshape(k, -1).T).T
        before = time_major.clone()
        torch.testing.assert_close(lin.vjp(V), want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(time_major, before, rtol=0, atol=0)
        torch.testing.assert_close(lin.vjp(V, consume=True), want, rtol=1e-10, atol=1e-12)
        assert not torch.equal(time_major, before)  # consumed: the recurrence ran in it


@pytest.mark.parametrize("fused_max", [0, 10**9])
def test_lstm_single_vectors_by_its_own_backward_or_the_adjoint_recurrence(monkeypatch, fused_max):
    """Small chunks take ``Jᵀ v`` of one vector through the module's own backward, large ones
    through the explicit adjoint recurrence: both against the dense Jacobian."""
    from lanczos_ntk.operators import _rnn_path

    monkeypatch.setattr(_rnn_path, "FUSED_VJP_MAX_STATES", fused_max)
    model = seeded(nn.LSTM, 2, 3, num_layers=2, batch_first=True, dtype=F64)
    u = inputs(B=4, T=5)
    K = lnk.StateNTK(model, u, chunk_size=3)
    check_products(K, dense_jacobian(model, u))
    fused = [K.engine._linearization(i).graph is not None for i in range(len(K.engine.chunks))]
    assert fused == [fused_max > 0] * 2


@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (nn.LSTM, {"bias": False}),
        (nn.GRU, {"num_layers": 3}),
        (nn.RNN, {"num_layers": 2, "nonlinearity": "relu"}),
    ],
)
def test_torch_rnns_closed_form_for_some_parameters(cls, kwargs):
    """Only some weights differentiated (the others constants of the kernel), no biases, deeper
    stacks: the closed form against torch's own (fused) forward differentiated densely."""
    torch.manual_seed(2)
    model = cls(3, 4, batch_first=True, dtype=F64, **kwargs)
    u = inputs(B=3, T=6, d=3, seed=7)
    names = [n for n, _ in model.named_parameters() if "hh_l0" in n or "ih_l1" in n]
    K = lnk.StateNTK(model, u, params=names)
    assert "closed form" in K.plan.cell
    check_products(K, dense_jacobian(model, u, params=names))


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
@pytest.mark.parametrize("name", ["weight_ih_l1", "weight_hh_l1"])
def test_torch_rnns_with_only_an_upper_layer_differentiated(cls, name):
    """No parameter of the first layer moves and its input is fixed: its tangent starts from
    zero at every step (written into, not an expanded zero)."""
    model, u = seeded(cls, 2, 3, num_layers=2, batch_first=True, dtype=F64), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u, params=[name])
    assert "closed form" in K.plan.cell
    check_products(K, dense_jacobian(model, u, params=[name]))


def test_relu_rnn_and_no_bias():
    torch.manual_seed(1)
    model = nn.RNN(2, 4, nonlinearity="relu", bias=False, batch_first=True, dtype=F64)
    u = inputs()
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "cell"
    check_products(K, dense_jacobian(model, u))


@pytest.mark.parametrize(
    "name, model",
    [
        ("ctrnn", lambda: models.CTRNN(4, 2, gain=1.7, seed=1)),
        ("gru", lambda: models.GRU(3, 2, seed=3)),
        ("user", StepModule),
        ("lstm", lambda: seeded(nn.LSTM, 2, 3, batch_first=True, dtype=F64)),
    ],
)
def test_tiny_budget_chunks_and_splits_blocks(name, model):
    model, u = model(), inputs(B=6)
    big = lnk.StateNTK(model, u)
    assert big.plan.num_chunks == 1 and big.plan.cached
    c1, w1 = big.plan.cache_bytes // 6, big.plan.work_bytes_per_vector // 6  # per trial (and vector)
    one = c1 + w1
    K = lnk.StateNTK(model, u, memory_budget=int(2.5 * one))
    assert K.plan.num_chunks > 1 and K.plan.block_columns < 4
    assert K.plan.budget_bytes == int(2.5 * one)
    held = K.plan.cache_bytes if K.plan.cached else K.plan.chunk_size * c1
    assert held + K.plan.work_bytes_per_vector <= K.plan.budget_bytes
    assert "chunk" in str(K.plan) and "MiB" in str(K.plan)
    check_products(K, dense_jacobian(model, u), full=False)
    with pytest.raises(ValueError, match="too small for one trial"):
        lnk.StateNTK(model, u, memory_budget=one // 2)


def test_opaque_blocks_share_one_pass(monkeypatch):
    from lanczos_ntk.operators import _dual_graph

    monkeypatch.setattr(_dual_graph, "_ENGINE_GRAD", None)  # every pass through autograd.grad

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.W = nn.Parameter(0.5 * torch.randn(3, 3, generator=gen(1), dtype=F64))

        def forward(self, u):
            h, out = torch.zeros(u.shape[0], 3, dtype=u.dtype), []
            for t in range(u.shape[1]):
                h = torch.tanh(h @ self.W.T + u[:, t, :1])
                out.append(h)
            return torch.stack(out, 1)

    model, u = Opaque(), inputs()
    K = lnk.StateNTK(model, u, jvp="double_vjp")
    assert K.plan.path == "autograd" and K.plan.cached
    check_products(K, dense_jacobian(model, u))
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return grad(*args, **kwargs)

    torch.autograd.grad = counting
    try:  # the graph and its dual are cached: a block of 4 is one batched call each way
        K.engine.jvp(torch.ones(K.engine.P, 4, dtype=F64))
        K.engine.vjp(torch.ones(K.engine.M, 4, dtype=F64))
    finally:
        torch.autograd.grad = grad
    assert calls == [True, True]
    # outputs wider than the CPU working set go through the double backward in column groups
    # (two vectors' outputs fit here: groups of 2), with the same products
    import lanczos_ntk.operators._engine as engine_module

    X = torch.randn(K.engine.P, 5, dtype=F64, generator=gen(4))
    want = K.engine.jvp(X)
    calls.clear()
    saved = engine_module.DOUBLE_VJP_WORKING_SET
    engine_module.DOUBLE_VJP_WORKING_SET = 2 * K.engine.M * 8
    torch.autograd.grad = counting
    try:
        got = K.engine.jvp(X)
    finally:
        torch.autograd.grad = grad
        engine_module.DOUBLE_VJP_WORKING_SET = saved
    assert calls == [True, True, False]  # columns 0-1, 2-3 batched; 4 alone in a plain pass
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, dense_jacobian(model, u) @ X, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"chunk_size": 2.5}, "whole number"),
        ({"chunk_size": True}, "whole number"),
        ({"memory_budget": -1}, "memory_budget"),
        ({"memory_budget": "1GB"}, "memory_budget"),
    ],
)
def test_bad_plan_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lnk.StateNTK(models.CTRNN(3, 2, seed=0), inputs(), **kwargs)


def test_a_forward_that_fails_on_the_inputs_says_which_inputs():
    with pytest.raises(ValueError, match=r"forward failed on inputs of shape \(3, 4, 5\) \(\[B, T, d_in\]\)"):
        lnk.StateNTK(StepModule(d=2), inputs(d=5))


def test_half_precision_models_are_refused():
    with pytest.raises(TypeError, match="half precision"):
        lnk.StateNTK(models.CTRNN(3, 2, seed=0, dtype=torch.float16), inputs().half())


def test_cell_path_gram_matches_dense_for_normal_forms():
    for form in models.DISCRETE_FORMS:
        model, u = models.DiscreteNormalForm(form, mu=-0.2, input_size=2), inputs()
        K = lnk.StateNTK(model, u)
        assert K.plan.path == "cell"
        assert_operator_close(K.dual(), dense_gram(model, u), rtol=1e-10)


def test_wide_blocks_on_the_closed_form_path_match_dense():
    model, u = models.CTRNN(4, 2, gain=1.7, seed=1), inputs(B=5)
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "closed_form"
    check_products(K, dense_jacobian(model, u), full=False)


class _ForwardOnly(nn.Module):
    """A user's forward-only module, its states scaled after the loop (so no cell is read off
    it: the autograd path); ``act`` its nonlinearity."""

    act = staticmethod(torch.tanh)

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.randn(3, 3, generator=gen(1), dtype=F64))
        self.U = nn.Parameter(torch.randn(3, 2, generator=gen(2), dtype=F64))

    def forward(self, u):
        h, out = torch.zeros(u.shape[0], 3, dtype=u.dtype), []
        for t in range(u.shape[1]):
            h = self.act(h @ self.W.T + u[:, t] @ self.U.T)
            out.append(h)
        return 0.5 * torch.stack(out, 1)


class _Loop(nn.Module):
    """Forward-only modules that loop over one update (``update(h, u_t)``), from zeros."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(0.5 * torch.randn(3, 3, generator=gen(1), dtype=F64))
        self.U = nn.Parameter(torch.randn(3, 2, generator=gen(2), dtype=F64))

    def update(self, h, u, t):
        return torch.tanh(h @ self.W.T + u @ self.U.T)

    def states(self, u):
        h, out = torch.zeros(u.shape[0], 3, dtype=u.dtype), []
        for t in range(u.shape[1]):
            h = self.update(h, u[:, t], t)
            out.append(h)
        return out

    def forward(self, u):
        return torch.stack(self.states(u), 1)


class _LayersLoop(_Loop):
    def __init__(self):
        super().__init__()
        torch.manual_seed(8)
        self.cell = nn.GRUCell(2, 3, dtype=F64)
        self.norm = nn.LayerNorm(3, dtype=F64)

    def update(self, h, u, t):
        return self.norm(self.cell(u, h)) + 0.1 * h


class _Surrogate(torch.autograd.Function):
    """A step function forward, a smooth surrogate backward (as in spiking networks)."""

    @staticmethod
    def forward(x):
        return (x > 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (1 + x.abs()) ** 2


class _SurrogateLoop(_Loop):
    def update(self, h, u, t):
        return 0.5 * h + _Surrogate.apply(h @ self.W.T + u @ self.U.T)


class _TwoStatesLoop(_Loop):
    def forward(self, u):
        h = g = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            h, g = torch.tanh(h @ self.W.T + u[:, t] @ self.U.T) + 0.3 * g, h
            out.append(h)
        return torch.stack(out, 1)


class _LSTMLoop(nn.Module):
    """An LSTM written out by hand: the loop carries (h, c) and stacks h."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(0.4 * torch.randn(12, 3, generator=gen(11), dtype=F64))
        self.U = nn.Parameter(torch.randn(12, 2, generator=gen(12), dtype=F64))
        self.b = nn.Parameter(0.1 * torch.randn(12, generator=gen(13), dtype=F64))

    def forward(self, u):
        h = c = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            i, f, g, o = (h @ self.W.T + u[:, t] @ self.U.T + self.b).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            out.append(h)
        return torch.stack(out, 1)


class _AlternatingLoop(_Loop):
    def update(self, h, u, t):
        return super().update(h, u, t) * (1.0 if t % 2 else 0.5)


class _ReadOutLoop(_Loop):
    def forward(self, u):
        return 2.0 * super().forward(u)


class _ProjectedLoop(_Loop):
    """The inputs projected for all steps before the loop, the step reading ``x[:, t]``."""

    def project(self, u):
        return torch.tanh(u @ self.U.T)

    def forward(self, u):
        x = self.project(u)
        h, out = torch.zeros(u.shape[0], 3, dtype=u.dtype), []
        for t in range(u.shape[1]):
            h = torch.tanh(h @ self.W.T + x[:, t])
            out.append(h)
        return torch.stack(out, 1)


class _CumulativeLoop(_ProjectedLoop):
    """A projection before the loop that mixes time steps (a running sum): not one step's."""

    def project(self, u):
        return torch.cumsum(u @ self.U.T, 1)


class _ConstantLoop(_Loop):
    """A step that uses a plain tensor attribute (neither parameter nor buffer)."""

    def __init__(self):
        super().__init__()
        self.mask = torch.tensor([1.0, 0.0, 1.0], dtype=F64)

    def update(self, h, u, t):
        return torch.tanh((h * self.mask) @ self.W.T + u @ self.U.T)


class _OtherStackings(_Loop):
    """The states gathered the other usual ways: stack over time then transpose, or concatenate
    the states unsqueezed at the time axis."""

    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, u):
        out = self.states(u)
        if self.how == "transpose":
            return torch.stack(out).transpose(0, 1)
        if self.how == "permute":
            return torch.stack(out).permute(1, 0, 2)
        return torch.cat([h.unsqueeze(-2) for h in out], dim=1)


class _KeepingLoop(_Loop):
    """A forward that keeps its last state and a count of calls on the module."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=F64))

    def forward(self, u):
        out = super().forward(u)
        self.last_state = out[:, -1]
        self.calls = self.calls + 1
        return out


def test_reading_the_loop_leaves_the_module_as_it_was():
    from lanczos_ntk.operators._loop_cell import loop_cell_fn

    model, u = _KeepingLoop(), inputs(B=3)
    values = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    assert loop_cell_fn(model, {k: v.detach() for k, v in values.items()}, u[:1], 3) is not None
    assert "last_state" not in vars(model) and float(model.calls) == 0.0  # the trace left nothing
    K = lnk.StateNTK(model, u)
    assert K.plan.cell == "loop read off forward"
    # what the module keeps comes from real runs of its forward only, never from the trace
    for kept in (vars(model).get("last_state"), model.calls):
        assert kept is None or type(kept) is torch.Tensor
    model(u)
    assert type(model.last_state) is torch.Tensor and type(model.calls) is torch.Tensor
    torch.testing.assert_close(model.last_state, model(u)[:, -1])


def test_the_cache_of_loop_cells_does_not_keep_modules_alive():
    import gc
    import weakref

    from lanczos_ntk.operators import _cells

    model, u = _Loop(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert model in _cells._LOOP_CELLS and K.plan.cell == "loop read off forward"
    again = lnk.StateNTK(model, u)  # the cached cell, checked again
    assert again.engine._cell is K.engine._cell
    alive = weakref.ref(model)
    del model, K, again
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize(
    "model, chunk_size",
    [
        (_Loop, None),
        (_Loop, 2),
        (_LayersLoop, None),
        (_ProjectedLoop, None),
        (_ProjectedLoop, 2),
        (_ConstantLoop, None),
        (lambda: _OtherStackings("transpose"), None),
        (lambda: _OtherStackings("permute"), None),
        (lambda: _OtherStackings("cat"), None),
        (_TwoStatesLoop, None),
        (_LSTMLoop, None),
        (_LSTMLoop, 2),
    ],
)
def test_a_forward_that_loops_over_one_update_gets_a_cell(model, chunk_size):
    model, u = model(), inputs(B=5)
    K = lnk.StateNTK(model, u, chunk_size=chunk_size)
    assert K.plan.path == "cell" and K.plan.cell == "loop read off forward"
    assert _linearization(K).traced() is not None
    check_products(K, dense_jacobian(model, u))


@pytest.mark.parametrize("model", [_SurrogateLoop, _AlternatingLoop, _ReadOutLoop, _CumulativeLoop])
def test_loops_without_a_plain_cell_keep_the_autograd_path(model):
    """An update with its own backward (a surrogate gradient: the traced cell would carry the
    true derivative), a step that depends on t, a readout after the loop, a projection before
    the loop that mixes time steps."""
    model, u = model(), inputs(B=3)
    K = lnk.StateNTK(model, u)
    assert K.plan.path == "autograd"
    check_products(K, dense_jacobian(model, u), full=False)


@pytest.mark.parametrize("chunk_size", [None, 1])
def test_linearized_forward_against_dense(chunk_size):
    model, u = _ForwardOnly(), inputs()
    J = dense_jacobian(model, u)
    # the first product through linear_operator's matmul (an autograd.Function, where forward
    # mode is off): the trace must still see the tangents
    K = lnk.StateNTK(model, u, jvp="linearize", chunk_size=chunk_size)
    V = torch.randn(J.shape[0], 2, generator=gen(7), dtype=F64)
    torch.testing.assert_close(K.matmul(V), J @ (J.T @ V), rtol=1e-11, atol=1e-11)
    top = lnk.eigsh(lnk.StateNTK(model, u, jvp="linearize", chunk_size=chunk_size), k=2, generator=gen(0))
    torch.testing.assert_close(top.eigenvalues, torch.linalg.eigvalsh(J.T @ J).flip(0)[:2], rtol=1e-9, atol=0)
    K = lnk.StateNTK(model, u, jvp="linearize", chunk_size=chunk_size)
    assert K.plan.jvp == "linearize" and K.plan.path == "autograd" and K.plan.cached
    check_products(K, J, full=False)


def test_auto_linearizes_large_opaque_modules_only(monkeypatch):
    import lanczos_ntk.operators._engine as engine_module

    model, u = _ForwardOnly(), inputs()
    assert lnk.StateNTK(model, u).plan.jvp == "double_vjp"  # small: no trace
    monkeypatch.setattr(engine_module, "LINEARIZE_MIN_OUTPUTS", u.shape[0] * u.shape[1] * 3)
    monkeypatch.setattr(engine_module, "LINEARIZE_AFTER_VECTORS", 3)
    K = lnk.StateNTK(model, u)
    # large: forward mode first, traced once 3 vectors have gone through J x
    assert (K.plan.jvp, K.plan.trace_after) == ("forward", 3) and "traced after 3" in str(K.plan)
    J = dense_jacobian(model, u)
    X = torch.randn(J.shape[1], 2, generator=gen(6), dtype=F64)
    torch.testing.assert_close(K.engine.jvp(X), J @ X, rtol=1e-10, atol=1e-12)
    assert K.plan.jvp == "forward"  # 2 vectors so far
    torch.testing.assert_close(K.dual().matmul(X[:, :1]), J.T @ (J @ X[:, :1]), rtol=1e-10, atol=1e-12)
    assert K.plan.jvp == "linearize" and K.engine._linearization(0).linearized is None
    check_products(K, J)  # traced by the next product, used from then on
    assert K.engine._linearization(0).linearized is not None
    assert lnk.StateNTK(model, u, jvp="linearize").plan.trace_after is None  # asked: at once
    # without room to cache the traced JVP it would be redone every product: forward mode
    assert lnk.StateNTK(model, u, cache=False).plan.jvp == "forward"


def test_linearize_needs_forward_mode():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return torch.tanh(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(output)

        @staticmethod
        def backward(ctx, g):
            (y,) = ctx.saved_tensors
            return g * (1 - y * y)

    class Opaque(_ForwardOnly):
        act = staticmethod(NoForwardAD.apply)

    model, u = Opaque(), inputs()
    with pytest.raises(ValueError, match="forward-mode AD"):
        lnk.StateNTK(model, u, jvp="linearize")
    K = lnk.StateNTK(model, u)  # auto: the VJP of a VJP
    assert K.plan.jvp == "double_vjp"
    check_products(K, dense_jacobian(model, u))


@pytest.mark.parametrize(
    "model, buffer",
    [(lambda: models.CTRNN(3, 2, seed=0).double(), "closed.vjp"), (StepModule, "cell.vjp")],
)
def test_a_gram_product_runs_its_adjoint_in_place_of_its_own_tangents(model, buffer):
    """Inside Jᵀ J X the adjoint recurrence runs in the buffer J X was written to (no copy, no
    second buffer), with the same result as J and Jᵀ one after the other; K's adjoint, whose
    input is the caller's, still copies it."""
    model, u = model(), inputs(B=3, T=4)
    big = lnk.StateNTK(model, u).plan
    one = (big.cache_bytes + big.work_bytes_per_vector) // 3  # a trial's share
    K = lnk.StateNTK(model, u, memory_budget=int(1.5 * one))
    assert K.plan.num_chunks > 1
    J = dense_jacobian(model, u)
    X = torch.randn(J.shape[1], 3, generator=gen(5), dtype=F64)
    for k in (1, 3):
        got = K.dual().matmul(X[:, :k])
        torch.testing.assert_close(got, J.T @ (J @ X[:, :k]), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got, K.vjp(K.jvp(X[:, :k])), rtol=1e-12, atol=1e-12)
    K.engine._scratch.clear()
    K.dual().matmul(X)
    assert buffer not in K.engine._scratch.sizes
    V = K.jvp(X)
    before = V.clone()
    K.vjp(V)
    assert buffer in K.engine._scratch.sizes
    torch.testing.assert_close(V, before, rtol=0, atol=0)


@pytest.mark.parametrize(
    "model",
    [
        lambda: models.CTRNN(3, 2, seed=0).double(),
        StepModule,
        lambda: seeded(nn.GRU, 2, 3, batch_first=True, dtype=F64),
    ],
)
def test_results_do_not_share_the_work_buffers(model):
    """The product paths reuse their work buffers from product to product: what a product
    returned stays as it was after the next ones (in every form: J x, Jᵀ v, K, G)."""
    model, u = model(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    G = K.dual()
    J = dense_jacobian(model, u)
    x1, x2 = (torch.randn(J.shape[1], 1, generator=gen(s), dtype=F64) for s in (1, 2))
    v1, v2 = (torch.randn(J.shape[0], 1, generator=gen(s), dtype=F64) for s in (3, 4))
    kept = [K.jvp(x1), K.vjp(v1), K.matmul(v1), G.matmul(x1)]
    for _ in range(2):
        K.jvp(x2), K.vjp(v2), K.matmul(v2), G.matmul(x2)
    want = [J @ x1, J.T @ v1, J @ (J.T @ v1), J.T @ (J @ x1)]
    for got, ref in zip(kept, want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert K.engine._scratch.nbytes > 0


def test_later_operators_on_a_step_module_reuse_its_traces(monkeypatch, direct_now):
    """The traces of a module's step are code, not values: a second operator (new weights, new
    inputs of the same shapes) checks and reuses them instead of tracing again; a step changed
    in between fails the check and is traced anew; the traces do not keep the module alive."""
    import gc
    import types
    import weakref

    from lanczos_ntk.operators import _cells

    traced = {"step": 0, "direct": 0}
    for name, key in (("trace_step", "step"), ("trace_direct", "direct")):
        real = getattr(_cells, name)

        def counting(*args, real=real, key=key):
            traced[key] += 1
            return real(*args)

        monkeypatch.setattr(_cells, name, counting)
    model, u = EulerStep(), inputs(B=3, T=4)
    check_products(lnk.StateNTK(model, u), dense_jacobian(model, u), full=False)
    assert traced == {"step": 1, "direct": 1}
    with torch.no_grad():
        model.W.mul_(0.5)
    u2 = inputs(B=3, T=4, seed=9)
    K = lnk.StateNTK(model, u2)
    check_products(K, dense_jacobian(model, u2), full=False)
    assert traced == {"step": 1, "direct": 1}
    assert _linearization(K).traced() is not None and _linearization(K).traced_direct() is not None

    def other_step(self, h, x):  # the same shapes, other derivatives
        return h + 0.1 * (-h + torch.sin(h) @ self.W.T + x @ self.B.T)

    model.step = types.MethodType(other_step, model)
    check_products(lnk.StateNTK(model, u2), dense_jacobian(model, u2), full=False)
    assert traced == {"step": 2, "direct": 2}
    del model.step
    alive = weakref.ref(model)
    del model, K
    gc.collect()
    assert alive() is None


def test_the_direct_term_is_traced_once_enough_vectors_went_through():
    """A first top-10 solve (about 45 products) keeps the recorded graph of the direct term;
    from DIRECT_TRACE_AFTER vectors through the module's cells on, its traced form serves
    (the graph released), here in the middle of a run of products."""
    from lanczos_ntk.operators._cells import DIRECT_TRACE_AFTER

    model, u = EulerStep(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    J = dense_jacobian(model, u)
    lin = _linearization(K)
    X = torch.randn(J.shape[1], 1, generator=gen(6), dtype=F64)
    for i in range(DIRECT_TRACE_AFTER + 2):
        torch.testing.assert_close(K.jvp(X), J @ X, rtol=1e-10, atol=1e-12)
        assert (lin._direct_traced is False) == (i + 1 < DIRECT_TRACE_AFTER)  # from the 64th on
    assert lin.traced_direct() is not None and lin._direct_graph is None
    check_products(K, J, full=False)
    later = lnk.StateNTK(model, u)  # the module's count carries over: traced at once
    later.jvp(X)
    assert _linearization(later).traced_direct() is not None


def test_a_gram_product_counts_once_towards_the_direct_trace():
    """A ``G`` product (one ``J x``, one ``Jᵀ v``) is one vector: a top-10 solve of 48 of them
    on a fresh module stays below DIRECT_TRACE_AFTER = 64 and keeps the recorded graph."""
    from lanczos_ntk.operators._cells import DIRECT_TRACE_AFTER

    model, u = EulerStep(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    J = dense_jacobian(model, u)
    X = torch.randn(J.shape[1], 1, generator=gen(7), dtype=F64)
    for _ in range(DIRECT_TRACE_AFTER - 1):
        torch.testing.assert_close(K.dual().matmul(X), J.T @ (J @ X), rtol=1e-10, atol=1e-12)
    assert _linearization(K)._direct_traced is False
    K.dual().matmul(X)
    assert _linearization(K).traced_direct() is not None


def test_the_direct_term_of_large_chunks_is_traced_at_once(monkeypatch):
    from lanczos_ntk.operators import _cells

    model, u = EulerStep(), inputs(B=3, T=4)
    monkeypatch.setattr(_cells, "DIRECT_TRACE_NOW", 3 * 4 * model.n)  # this chunk's states
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    assert _linearization(K).traced_direct() is not None and _linearization(K)._direct_graph is None


class BiasStep(_Iterates):
    """A step whose bias enters additively: its direct term ``C x`` is the tangent broadcast."""

    def __init__(self, n=4):
        super().__init__()
        g = gen(12)
        self.W = nn.Parameter(torch.randn(n, n, generator=g, dtype=F64) / 2)
        self.b = nn.Parameter(torch.randn(n, generator=g, dtype=F64))
        self.n = n

    def step(self, h, u):
        return torch.tanh(h @ self.W.T + u.sum(-1, keepdim=True)) + self.b


@pytest.mark.parametrize("after", [0, 10**9])
@pytest.mark.parametrize("params", [["b"], None])
def test_a_direct_term_that_broadcasts_the_tangent(monkeypatch, after, params):
    """``C x`` may come back as a broadcast (``expand``) of the bias tangent, from the traced
    form or the recorded graph: the recurrence must not write into it (nor into the vector)."""
    from lanczos_ntk.operators import _cells

    monkeypatch.setattr(_cells, "DIRECT_TRACE_AFTER", after)
    model, u = BiasStep(), inputs(B=3, T=5)
    J = dense_jacobian(model, u, params=params)
    K = lnk.StateNTK(model, u, params=params)
    X = torch.randn(J.shape[1], 3, generator=gen(13), dtype=F64)
    before = X.clone()
    check_products(K, J, full=False)
    for k in (1, 3):
        torch.testing.assert_close(K.jvp(X[:, :k]), J @ before[:, :k], rtol=1e-10, atol=1e-12)
    assert torch.equal(X, before)


def test_a_row_major_block_is_transposed_exactly_even_with_an_infinite_entry():
    """Blocks arrive row-major ``[M, k]``; the engine reads them vector by vector through a
    product with the identity, exact to the bit, and by a plain copy when that product is not
    finite (``0 · inf`` would otherwise spread into the other vectors)."""
    from lanczos_ntk.operators._engine import _vector_rows
    from lanczos_ntk.operators._scratch import Scratch

    for dtype in (torch.float32, F64):
        V = torch.randn(1001, 5, generator=gen(8), dtype=dtype)
        V[3, 2] = torch.finfo(dtype).tiny / 4  # subnormal
        got = _vector_rows(V, Scratch())
        assert got.is_contiguous() and torch.equal(got, V.T)
        V[7, 1] = float("inf")
        got = _vector_rows(V, Scratch())
        assert torch.equal(got, V.T) and torch.isfinite(got[[0, 2, 3, 4]]).all()
    single = torch.randn(9, 1, dtype=F64)
    assert _vector_rows(single, Scratch()).data_ptr() == single.data_ptr()  # a view
    V = torch.randn(1001, 40, generator=gen(9))  # float32 products in reduced precision: a copy
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        assert torch.equal(_vector_rows(V, Scratch()), V.T)
    finally:
        torch.set_float32_matmul_precision(before)
    scratch = Scratch()  # a smaller block after a larger one takes a prefix of the same buffer
    big = _vector_rows(torch.randn(50, 3, generator=gen(10), dtype=F64), scratch)
    small = torch.randn(20, 2, generator=gen(11), dtype=F64)
    got = _vector_rows(small, scratch)
    assert torch.equal(got, small.T) and got.data_ptr() == big.data_ptr()


def _direct_form(K):
    return next(v for key, v in _linearization(K).cell._traces.items() if key[0] == "direct")


class _HandGRU(_Iterates):
    """A GRU written out: the candidate reads ``r ⊙ h``, so a tangent passes through a second
    matrix product."""

    def __init__(self, n=3, d=2):
        super().__init__()
        g = gen(15)
        self.Wg = nn.Parameter(0.5 * torch.randn(2 * n, n + d, generator=g, dtype=F64))
        self.bg = nn.Parameter(0.5 * torch.randn(2 * n, generator=g, dtype=F64))
        self.Wn = nn.Parameter(0.5 * torch.randn(n, n + d, generator=g, dtype=F64))
        self.bn = nn.Parameter(0.5 * torch.randn(n, generator=g, dtype=F64))
        self.n = n

    def step(self, h, u):
        r, z = torch.sigmoid(torch.cat([h, u], 1) @ self.Wg.T + self.bg).chunk(2, -1)
        c = torch.tanh(torch.cat([r * h, u], 1) @ self.Wn.T + self.bn)
        return (1 - z) * c + z * h


class _ScalarGain(_Iterates):
    """A gain that is one number."""

    def __init__(self, n=3, d=2):
        super().__init__()
        g = gen(16)
        self.a = nn.Parameter(torch.tensor(0.7, dtype=F64))
        self.W = nn.Parameter(0.5 * torch.randn(n, n, generator=g, dtype=F64))
        self.U = nn.Parameter(0.5 * torch.randn(n, d, generator=g, dtype=F64))
        self.n = n

    def step(self, h, u):
        return 0.7 * h + self.a * torch.tanh(h @ self.W.T + u @ self.U.T)


@pytest.mark.parametrize(
    "make, in_one_pass",
    [
        (EulerStep, True),  # matrix products with the tangents, and over the rows
        (StepModule, True),  # a bias broadcast over the rows (expand), summed back
        (BiasStep, True),  # an additive bias: C x is the tangent itself
        (TorchCellStep, True),  # torch's GRUCell: gates sliced and concatenated
        (_LSTMLoop, True),  # two states side by side: slice_backward
        (_ProjectedLoop, True),  # the input projection redone on u_t: select_backward
        (PiecewiseStep, True),  # where
        (_HandGRU, True),  # a tangent through a second product: outside the chain of products
        (_ScalarGain, True),  # a 0-dim parameter: its gradient sums over everything
        (LayersStep, (True, False)),  # softplus; layer norm's backward returns a tuple: one by one
    ],
)
def test_the_direct_term_of_a_block_goes_in_one_pass(direct_now, make, in_one_pass):
    """A block's ``C X`` and ``Cᵀ Λ`` run the traced graphs once, the ``k`` vectors of a row
    side by side, where every operation has a block rule (checked once per ``k`` against the
    vectors one by one); either way every product agrees with the dense truth."""
    model, u = make(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    form = _direct_form(K)
    jvp, vjp = in_one_pass if isinstance(in_one_pass, tuple) else (in_one_pass, in_one_pass)
    assert form.blocks == {("jvp", 4): jvp, ("vjp", 4): vjp}


def test_a_block_form_that_disagrees_is_refused(direct_now, monkeypatch):
    """A block rule that computes something else fails the check against the vectors one by one:
    the block goes vector by vector, and agrees with the dense truth."""
    from lanczos_ntk.operators import _traced_step
    from lanczos_ntk.operators._block_direct import Block

    real = _traced_step.run_block

    def off(*args):  # 0.1% off: C X in place in its output, Cᵀ Λ's gradients
        got = real(*args)
        if isinstance(got, Block):
            got.t.mul_(1.001)
            return got
        return tuple(Block(1.001 * g.t, g.rows) for g in got)

    monkeypatch.setattr(_traced_step, "run_block", off)
    model, u = EulerStep(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    assert _direct_form(K).blocks == {("jvp", 4): False, ("vjp", 4): False}


def test_run_block_on_hand_made_linear_maps():
    """``run_block`` on traced maps of tangents (``[k, ...]``) to rows and of rows (``[R, k, ...]``)
    to gradients against the maps applied vector by vector: products with the tangents on
    either side, a transposed product over the rows, sums over rows and columns, broadcasts,
    slices, selects and concatenations."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from lanczos_ntk.operators._block_direct import Block, run_block

    R, S, c, k = 6, 4, 3, 5
    g = gen(14)
    r = torch.randn(R, c, generator=g, dtype=F64)
    y = torch.randn(R, S, generator=g, dtype=F64)

    def forward(r, y, W, b):  # tangents -> rows
        z = r @ W.T + b
        return torch.cat([y[:, :2] * z[:, 2:], -z[:, :2]], 1) + 0.5 * (y @ W[:, :S].T)[:, :S]

    def backward(r, y, lam):  # rows -> gradients
        m = lam * (1 - y * y)
        return m.T @ r, m.sum(0), lam.select(1, 0) @ r, (lam[:, 1:3] * y[:, :2]).sum(0, keepdim=True)

    # a parameter-shaped value times a residual with a rows dimension (the result has the
    # residual's rank), with as many vectors as rows
    gm = make_fx(lambda r, db: db * r)(y, y[0])
    db = torch.randn(R, S, generator=g, dtype=F64)
    got = run_block(gm, (y, Block(db, rows=False)), R).as_rows()
    torch.testing.assert_close(got, torch.stack([db[j] * y for j in range(R)], 1))
    W = torch.randn(k, S, c + S, generator=g, dtype=F64)
    b = torch.randn(k, S, generator=g, dtype=F64)
    lam = torch.randn(R, k, S, generator=g, dtype=F64)
    r2 = torch.cat([r, y], 1)
    fwd = make_fx(forward)(r2, y, W[0], b[0])
    got = run_block(fwd, (r2, y, Block(W, rows=False), Block(b, rows=False)), k).as_rows()
    want = torch.stack([forward(r2, y, W[j], b[j]) for j in range(k)], 1)
    torch.testing.assert_close(got, want)
    bwd = make_fx(backward)(r, y, lam[:, 0])
    got = run_block(bwd, (r, y, Block(lam, rows=True)), k)
    for j in range(k):
        for part, one in zip(got, backward(r, y, lam[:, j])):
            torch.testing.assert_close(part.front()[j], one)


def test_a_block_shares_passes_over_the_rows(direct_now):
    """The Euler cell with a bias (``StepModule``): ``C X`` is one product ``[h, u, 1] M`` (a
    chain of ``addmm`` s and the broadcast bias), ``Cᵀ Λ`` one product ``[h, u, 1]ᵀ Λ`` (both
    weights' products over the rows and the bias's sum), as in the closed forms."""
    from lanczos_ntk.operators._block_direct import _Fusions
    from lanczos_ntk.operators._traced_step import _module

    model, u = StepModule(), inputs(B=3, T=4)
    K = lnk.StateNTK(model, u)
    check_products(K, dense_jacobian(model, u), full=False)
    form = _direct_form(K)
    chains = _Fusions.of(_module(form.jvp_into)).chains
    over = _Fusions.of(_module(form.vjp_scaled_late or form.vjp.apply)).over
    assert [len(links) for links in chains.values()] == [2]  # two products (W, B) into one
    assert [sorted(r is None for _, r in items) for items in over.values()] == [[False, False, True]]
