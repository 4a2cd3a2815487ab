"""The implicit sNTK operator against dense float64 references (jacrev J, K = J Jᵀ, G = Jᵀ J)."""

import numpy as np
import pytest
import torch
from torch import nn

import lanczos_ntk as lnk
from lanczos_ntk import models
from lanczos_ntk.testing import (
    assert_operator_close,
    dense_gram,
    dense_jacobian,
    dense_ntk,
)
from tests.helpers import gen, inputs

F64 = torch.float64


class UserModel(nn.Module):
    """A user's own module: forward(u) -> states [B, T, n] (a leaky linear RNN with a tanh)."""

    def __init__(self):
        super().__init__()
        g = gen(5)
        self.A = nn.Parameter(0.4 * torch.randn(3, 3, generator=g, dtype=F64))
        self.C = nn.Parameter(torch.randn(3, 2, generator=g, dtype=F64))
        self.register_buffer("leak", torch.tensor(0.8, dtype=F64))

    def forward(self, u):
        h = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            h = self.leak * h + torch.tanh(h @ self.A.T + u[:, t] @ self.C.T)
            out.append(h)
        return torch.stack(out, 1)


class ProjectedUserModel(UserModel):
    """The same network with its inputs projected for all steps before the loop (the step reads
    ``x[:, t]`` of a computed ``x``): the projection is redone per step inside the cell."""

    def forward(self, u):
        x = u @ self.C.T
        h = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            h = self.leak * h + torch.tanh(h @ self.A.T + x[:, t])
            out.append(h)
        return torch.stack(out, 1)


class ScaledUserModel(UserModel):
    """The same network with its states scaled after the loop: the stacked states are not the
    output, so no cell is read off the forward (the autograd path)."""

    def forward(self, u):
        return 1.5 * super().forward(u)


def torch_rnn(cls):
    torch.manual_seed(0)  # torch's own RNN init draws from the global generator
    return cls(2, 3, batch_first=True, dtype=F64)


MODELS = {
    "ctrnn": lambda: models.CTRNN(4, 2, gain=1.7, seed=1, readout_size=2),
    "rnn": lambda: models.DiscreteRNN(4, 2, gain=1.2, seed=2, readout_size=2),
    "gru": lambda: models.GRU(3, 2, seed=3),
    "ssm": lambda: models.DiagonalSSM(2, 2, seed=4, readout_size=2),
    **{
        f"flow_{f}": (lambda f=f: models.ContinuousNormalForm(f, mu=-0.3, input_size=2))
        for f in models.CONTINUOUS_FORMS
    },
    **{
        f"map_{f}": (lambda f=f: models.DiscreteNormalForm(f, mu=-0.3, input_size=2))
        for f in models.DISCRETE_FORMS
    },
    "user": UserModel,
    "user_projected": ProjectedUserModel,
    "user_scaled": ScaledUserModel,
    "torch_rnn": lambda: torch_rnn(nn.RNN),
    "torch_gru": lambda: torch_rnn(nn.GRU),
    "torch_lstm": lambda: torch_rnn(nn.LSTM),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_matvec_and_matmul_match_dense(name):
    model, u = MODELS[name](), inputs()
    K = lnk.StateNTK(model, u)
    Kd = dense_ntk(model, u)
    v = torch.randn(K.shape[0], 3, generator=gen(1), dtype=F64)
    ref = Kd @ v
    assert torch.linalg.norm(K @ v[:, 0] - ref[:, 0]) <= 1e-10 * torch.linalg.norm(ref[:, 0])
    assert torch.linalg.norm(K.matmul(v) - ref) <= 1e-10 * torch.linalg.norm(ref)
    assert_operator_close(K, Kd, rtol=1e-10)
    assert_operator_close(K.dual(), dense_gram(model, u), rtol=1e-10)


@pytest.mark.parametrize(
    "name", ["ctrnn", "gru", "ssm", "map_neimark_sacker", "user", "user_projected", "user_scaled"]
)
def test_dual_has_the_same_nonzero_spectrum(name):
    model, u = MODELS[name](), inputs(B=2, T=3)
    K, G = lnk.StateNTK(model, u), lnk.StateNTK(model, u).dual()
    ek = torch.linalg.eigvalsh(lnk.testing.dense_operator(K))
    eg = torch.linalg.eigvalsh(lnk.testing.dense_operator(G))
    r = min(K.shape[0], G.shape[0])
    top = max(ek.max(), eg.max())
    torch.testing.assert_close(ek[-r:], eg[-r:], atol=1e-10 * top, rtol=0)
    extra = ek[:-r] if K.shape[0] > r else eg[:-r]
    assert extra.abs().max() <= 1e-10 * top  # the surplus side holds only zeros


@pytest.mark.parametrize("name", ["ctrnn", "rnn", "gru", "flow_hopf", "user", "user_scaled", "torch_lstm"])
def test_chunked_equals_unchunked(name):
    model, u = MODELS[name](), inputs(B=5)
    K1 = lnk.StateNTK(model, u)
    X = torch.randn(K1.shape[0], 2, generator=gen(8), dtype=F64)
    Y = torch.randn(K1.dual().shape[0], 2, generator=gen(3), dtype=F64)
    for cache in (None, False):  # by default every chunk's linearisation fits and is kept
        K2 = lnk.StateNTK(model, u, chunk_size=2, cache=cache)
        assert len(K2.engine.chunks) == 3
        assert K2.engine.cache == (cache is None) and K2.plan.num_chunks == 3
        torch.testing.assert_close(K2.matmul(X), K1.matmul(X), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(K2.dual().matmul(Y), K1.dual().matmul(Y), rtol=1e-12, atol=1e-12)
        assert len(K2.engine._lin) == (3 if cache is None else 0)


@pytest.mark.parametrize(
    "name", ["ctrnn", "rnn", "gru", "ssm", "map_flip", "user", "user_projected", "user_scaled"]
)
def test_jvp_modes_agree(name):
    model, u = MODELS[name](), inputs()
    modes = (
        ["forward", "double_vjp"]
        + (["structured"] if name in ("ctrnn", "rnn") else [])
        + (["cell"] if name != "user_scaled" else [])
    )
    ops = [lnk.StateNTK(model, u, jvp=m) for m in modes]
    X = torch.randn(ops[0].dual().shape[0], 3, generator=gen(4), dtype=F64)
    V = torch.randn(ops[0].shape[0], 3, generator=gen(5), dtype=F64)
    J = dense_jacobian(model, u)
    for op in ops:
        assert torch.linalg.norm(op.jvp(X) - J @ X) <= 1e-10 * torch.linalg.norm(J @ X)
        assert torch.linalg.norm(op.vjp(V) - J.T @ V) <= 1e-10 * torch.linalg.norm(J.T @ V)


def test_auto_mode_choices():
    u = inputs()
    assert lnk.StateNTK(MODELS["ctrnn"](), u).engine.jvp_mode == "structured"
    for name in ("gru", "ssm", "map_flip", "torch_rnn", "torch_gru", "torch_lstm"):
        assert lnk.StateNTK(MODELS[name](), u).engine.jvp_mode == "cell", name
    # no step method, a plain loop (inputs read as they are or projected before the loop):
    # its update read off the forward is the cell
    for name in ("user", "user_projected"):
        K = lnk.StateNTK(MODELS[name](), u)
        assert K.engine.jvp_mode == "cell" and K.plan.cell == "loop read off forward", name
    # no cell at all: the cached autograd graph, J x as a VJP of its VJP; forward mode when
    # the graphs are not kept
    assert lnk.StateNTK(MODELS["user_scaled"](), u).engine.jvp_mode == "double_vjp"
    assert lnk.StateNTK(MODELS["user_scaled"](), u, cache=False).engine.jvp_mode == "forward"
    # readout outputs go through autograd even for the structured models
    assert lnk.StateNTK(MODELS["ctrnn"](), u, outputs="readout").engine.plan.path == "autograd"
    with pytest.raises(ValueError, match="structured"):
        lnk.StateNTK(MODELS["gru"](), u, jvp="structured")


@pytest.mark.parametrize("name", ["ctrnn", "rnn", "ssm"])
def test_readout_and_callable_outputs(name):
    model, u = MODELS[name](), inputs()
    K = lnk.StateNTK(model, u, outputs="readout")
    assert K.shape[0] == 3 * 4 * 2
    assert_operator_close(K, dense_ntk(model, u, outputs="readout"))

    def energy(h):
        return (h**2).sum(-1, keepdim=True)

    K2 = lnk.StateNTK(model, u, outputs=energy)
    assert K2.shape[0] == 3 * 4
    assert_operator_close(K2, dense_ntk(model, u, outputs=energy))


@pytest.mark.parametrize(
    "name, params",
    [
        ("ctrnn", ["W"]),
        ("ctrnn", ["b", "U"]),
        ("gru", ["U"]),
        ("map_pitchfork", ["mu"]),
        ("torch_gru", ["weight_hh_l0"]),
    ],
)
def test_parameter_subsets(name, params):
    model, u = MODELS[name](), inputs()
    K = lnk.StateNTK(model, u, params=params)
    assert K.param_names == tuple(params)
    J = dense_jacobian(model, u, params=params)
    assert K.dual().shape[0] == J.shape[1]
    assert_operator_close(K, J @ J.T)
    # the subset's kernel is the corresponding columns of the full Jacobian
    full = dense_jacobian(model, u)
    names = [n for n, _ in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    offsets = dict(zip(names, np.cumsum([0] + sizes[:-1])))
    cols = torch.cat([torch.arange(offsets[n], offsets[n] + dict(zip(names, sizes))[n]) for n in params])
    torch.testing.assert_close(J, full[:, cols])


def test_initial_state_and_frozen_parameters():
    model, u = MODELS["ctrnn"](), inputs()
    h0 = torch.randn(3, 4, generator=gen(6), dtype=F64)
    assert_operator_close(lnk.StateNTK(model, u, h0=h0), dense_ntk(model, u, h0=h0))
    model.W.requires_grad_(False)
    K = lnk.StateNTK(model, u)
    assert "W" not in K.param_names
    assert_operator_close(K, dense_ntk(model, u))


def test_float32_model_and_inputs_on_cpu():
    model = models.CTRNN(4, 2, seed=0, dtype=torch.float32)
    u = inputs().float()
    K = lnk.StateNTK(model, u)
    assert K.dtype == torch.float32
    ref = dense_ntk(models.CTRNN(4, 2, seed=0), inputs())
    got = lnk.testing.dense_operator(K)
    assert (got - ref).norm() <= 1e-5 * ref.norm()


def test_counts_scipy_and_linear_operator_api():
    from scipy.sparse.linalg import eigsh

    model, u = MODELS["ctrnn"](), inputs()
    K = lnk.StateNTK(model, u)
    Kd = dense_ntk(model, u)
    K.matmul(torch.ones(K.shape[0], 4, dtype=F64))
    K.mv(torch.ones(K.shape[0], dtype=F64))
    assert K.num_matvecs == 5
    assert K.dual().num_matvecs == 0
    vals = eigsh(K.to_scipy(), k=3, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(vals), torch.linalg.eigvalsh(Kd)[-3:].numpy(), rtol=1e-9)
    assert K.is_symmetric and K.dual().dual().shape == K.shape
    torch.testing.assert_close(K.to_dense(), Kd, rtol=1e-10, atol=1e-12)


def test_float_inputs_are_cast_and_on_demand():
    model = MODELS["ctrnn"]()
    K = lnk.StateNTK(model, inputs().float())
    assert_operator_close(K, dense_ntk(model, inputs().float().double()))


@pytest.mark.parametrize(
    "bad, match, err",
    [
        (torch.zeros(3, 4), "rank 3", ValueError),
        (torch.zeros(3, 4, 5, dtype=F64), "features", ValueError),
        (torch.zeros(3, 4, 2, dtype=torch.int32), "floating", TypeError),
        ("data", "torch.Tensor", TypeError),
    ],
)
def test_bad_inputs(bad, match, err):
    with pytest.raises(err, match=match):
        lnk.StateNTK(MODELS["ctrnn"](), bad)


def test_bad_models_and_options():
    u = inputs()
    frozen = MODELS["ctrnn"]().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lnk.StateNTK(frozen, u)
    with pytest.raises(ValueError, match="unknown parameter"):
        lnk.StateNTK(MODELS["ctrnn"](), u, params=["W", "nope"])
    with pytest.raises(ValueError, match="readout"):
        lnk.StateNTK(MODELS["gru"](), u, outputs="readout")
    with pytest.raises(ValueError, match="batch_first"):
        lnk.StateNTK(nn.RNN(2, 3, dtype=F64), u)
    with pytest.raises(ValueError, match="outputs of shape"):
        lnk.StateNTK(MODELS["ctrnn"](), u, outputs=lambda h: h.sum(-1))
    with pytest.raises(ValueError, match="chunk_size"):
        lnk.StateNTK(MODELS["ctrnn"](), u, chunk_size=0)
    with pytest.raises(ValueError, match="jvp"):
        lnk.StateNTK(MODELS["ctrnn"](), u, jvp="magic")
    with pytest.raises(TypeError, match="Module"):
        lnk.StateNTK(lambda u: u, u)
    K = lnk.StateNTK(MODELS["ctrnn"](), u)
    with pytest.raises(ValueError, match=r"expected a vector \[48\]"):
        K.mv(torch.ones(5, dtype=F64))


def test_non_finite_states_name_trial_and_step():
    model = models.ContinuousNormalForm("saddle_node", mu=1.0, input_size=2, dt=0.5)
    u = torch.zeros(3, 30, 2, dtype=F64)
    u[1] = -40.0  # trial 1 is driven to -infinity
    with pytest.raises(ValueError, match=r"trial 1, time step \d+"):
        lnk.StateNTK(model, u)


class _OpaqueTanh(torch.autograd.Function):
    """tanh as a custom kernel with a backward only (no forward-mode rule)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class OpaqueRNN(nn.Module):
    """h_{t+1} = tanh(W h_t + U u_t) with tanh as an opaque kernel (or torch.tanh as reference)."""

    def __init__(self, opaque=True):
        super().__init__()
        g = gen(9)
        self.W = nn.Parameter(0.5 * torch.randn(3, 3, generator=g, dtype=F64))
        self.U = nn.Parameter(torch.randn(3, 2, generator=g, dtype=F64))
        self.act = _OpaqueTanh.apply if opaque else torch.tanh

    def forward(self, u):  # the states scaled after the loop: no cell read off it
        h = torch.zeros(u.shape[0], 3, dtype=u.dtype)
        out = []
        for t in range(u.shape[1]):
            h = self.act(h @ self.W.T + u[:, t] @ self.U.T)
            out.append(h)
        return 0.5 * torch.stack(out, 1)


def test_kernels_without_forward_mode_fall_back_to_double_vjp():
    u = inputs()
    K = lnk.StateNTK(OpaqueRNN(opaque=True), u)
    assert K.engine.jvp_mode == "double_vjp"  # forward mode is missing: VJP of a VJP
    ref = dense_ntk(OpaqueRNN(opaque=False), u)  # same function through torch.tanh
    V = torch.randn(K.shape[0], 3, generator=gen(7), dtype=F64)
    assert torch.linalg.norm(K.matmul(V) - ref @ V) <= 1e-10 * torch.linalg.norm(ref @ V)
    assert_operator_close(K.dual(), dense_gram(OpaqueRNN(opaque=False), u))


class DoubledCTRNN(models.CTRNN):
    """A subclass that changes forward: the closed-form recurrence no longer describes it."""

    def forward(self, u, h0=None):
        return 2 * super().forward(u, h0)


def test_structured_path_only_where_it_is_exact():
    u = inputs()
    with pytest.raises(ValueError, match="outputs='states'"):
        lnk.StateNTK(MODELS["ctrnn"](), u, outputs="readout", jvp="structured")
    sub = DoubledCTRNN(4, 2, gain=1.7, seed=1)
    K = lnk.StateNTK(sub, u)
    assert K.engine.plan.path == "autograd"  # its step no longer reproduces its forward
    assert_operator_close(K, dense_ntk(sub, u))
    with pytest.raises(ValueError, match="structured"):
        lnk.StateNTK(sub, u, jvp="structured")


@pytest.mark.parametrize("name", ["ctrnn", "gru"])
def test_operator_is_a_snapshot_of_the_parameters(name):
    model, u = MODELS[name](), inputs()
    before = dense_ntk(model, u)
    K = lnk.StateNTK(model, u, cache=False)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # an optimiser step after the operator was built
    assert_operator_close(K, before)
    assert_operator_close(K.dual(), dense_gram(MODELS[name](), u))


def test_conversions_rebuild_over_a_converted_copy_of_the_model():
    model = MODELS["ctrnn"]()
    K = lnk.StateNTK(model, inputs())
    assert K.to(torch.float64) is K and K.double() is K
    for K32 in (K.float(), K.to(torch.float32)):
        assert K32.dtype == torch.float32 and K32.engine is not K.engine
        x = torch.randn(K.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close((K32 @ x.float()).double(), K @ x, rtol=1e-4, atol=1e-5)
    assert next(model.parameters()).dtype == torch.float64  # the user's model is untouched
    with pytest.raises(TypeError, match="half precision"):
        K.half()
