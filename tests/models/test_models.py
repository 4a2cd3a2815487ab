import pytest
import torch

import lanczos_ntk as lnk
from lanczos_ntk import models

ALL = [
    lambda: models.CTRNN(6, 2, gain=1.5, seed=1),
    lambda: models.DiscreteRNN(6, 2, seed=2),
    lambda: models.GRU(5, 2, seed=3),
    lambda: models.DiagonalSSM(3, 2, seed=4),
    *[(lambda f=f: models.ContinuousNormalForm(f)) for f in models.CONTINUOUS_FORMS],
    *[(lambda f=f: models.DiscreteNormalForm(f)) for f in models.DISCRETE_FORMS],
]


@pytest.mark.parametrize("make", ALL)
def test_forward_iterates_step(make):
    m = make()
    u = 0.3 * torch.randn(2, 4, m.input_size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = m(u)
    assert h.shape == (2, 4, m.state_size)
    x = torch.zeros(2, m.state_size, dtype=torch.float64)
    for t in range(4):
        x = m.step(x, u[:, t])
        torch.testing.assert_close(h[:, t], x)


def test_ctrnn_matches_formula():
    m = models.CTRNN(4, 1, gain=2.0, dt=0.2, seed=0)
    h = torch.randn(3, 4, dtype=torch.float64)
    u = torch.randn(3, 1, dtype=torch.float64)
    expected = h + 0.2 * (-h + torch.tanh(h) @ m.W.T + u @ m.U.T + m.b)
    torch.testing.assert_close(m.step(h, u), expected)


def test_seed_is_reproducible_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b = models.CTRNN(5, 1, seed=7), models.CTRNN(5, 1, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.W, b.W)
    assert not torch.equal(a.W, models.CTRNN(5, 1, seed=8).W)


def test_ssm_eigenvalues_match_step():
    m = models.DiagonalSSM(3, 1, seed=0)
    lam = m.eigenvalues()
    z = torch.randn(3, dtype=torch.complex128)
    h = torch.cat([z.real, z.imag])
    out = m.rhs(h, torch.zeros(1, dtype=torch.float64))
    torch.testing.assert_close(torch.complex(out[:3], out[3:]), lam * z)


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.zeros(2, 3), ValueError),
        (torch.zeros(2, 3, 5, dtype=torch.float64), ValueError),
        (torch.zeros(2, 3, 2, dtype=torch.int64), TypeError),
        ([[0.0]], TypeError),
    ],
)
def test_bad_inputs(bad, err):
    with pytest.raises(err, match="expected"):
        models.CTRNN(4, 2)(bad)


def test_unknown_form():
    with pytest.raises(ValueError, match="expected one of"):
        models.DiscreteNormalForm("hopf")


def test_result_roundtrip(tmp_path):
    """Tensors (real and complex), complex scalars, tuples and nested values survive save/load."""
    from lanczos_ntk.channels import CriticalDirection

    r = CriticalDirection(
        g=torch.randn(5, 2, dtype=torch.float64),
        d=torch.randn(5, 2, dtype=torch.float64),
        eigenvalue=complex(-0.1, 2.0),
        v=torch.randn(3, dtype=torch.complex128),
        w=torch.randn(3, dtype=torch.complex128),
        x=torch.zeros(3),
        kind="flow",
        param_names=("W", "b"),
    )
    path = r.save(tmp_path / "sub" / "crit")
    back = lnk.load_result(path)
    assert isinstance(back, CriticalDirection) and back.param_names == ("W", "b")
    assert back.eigenvalue == r.eigenvalue and back.x.dtype == torch.float32
    for name in ("g", "v", "w", "x"):
        assert torch.equal(getattr(back, name), getattr(r, name))
    assert r.to_dict()["kind"] == "flow" and lnk.Status("converged") is lnk.Status.CONVERGED
    with pytest.raises(TypeError, match="holds a CriticalDirection"):
        lnk.channels.ChannelReport.load(path)
    with pytest.raises(FileNotFoundError):
        lnk.load_result(tmp_path / "missing")


def test_atomic_write_leaves_ordinary_permissions(tmp_path):
    import os

    from lanczos_ntk._results import atomic_write_text

    atomic_write_text(tmp_path / "a.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert (os.stat(tmp_path / "a.txt").st_mode & 0o777) == (0o666 & ~umask)
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind


def test_readout_is_seeded_and_does_not_change_the_other_weights():
    torch.manual_seed(1)
    a = models.CTRNN(4, 1, seed=0, readout_size=2)
    torch.manual_seed(2)
    state = torch.random.get_rng_state()
    b = models.CTRNN(4, 1, seed=0, readout_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # global generator untouched
    assert torch.equal(a.readout.weight, b.readout.weight)
    assert torch.equal(a.W, models.CTRNN(4, 1, seed=0).W)
    assert a.readout.weight.dtype == torch.float64
    bound = 1 / 2.0
    assert float(a.readout.weight.detach().abs().max()) <= bound


@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")
def test_built_in_forward_can_be_traced_by_torch_func():
    # users linearise our models with torch.func; data-dependent checks in forward break that
    model = lnk.models.CTRNN(4, 1, seed=0).double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    u = torch.randn(2, 5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(p):
        return torch.func.functional_call(model, p, (u,))

    tangent = {k: torch.ones_like(v) for k, v in params.items()}
    _, lin = torch.func.linearize(f, params)
    _, ref = torch.func.jvp(f, (params,), (tangent,))
    torch.testing.assert_close(lin(tangent), ref)


def _numpy_trajectory(step, u, n):
    """States of ``h_{t+1} = step(h_t, u_t)`` from ``h_0 = 0``, in numpy (float64)."""
    import numpy as np

    B, T, _ = u.shape
    h = np.zeros((B, n))
    out = np.zeros((B, T, n))
    for t in range(T):
        h = step(h, u[:, t])
        out[:, t] = h
    return out


def test_gru_and_discrete_rnn_match_their_equations_written_in_numpy():
    """Independent references: the Cho et al. (2014) GRU (reset applied before the recurrent
    product, ``h' = (1 - z) h + z h̃``) and ``h' = tanh(W h + U u + b)``, written in numpy."""
    import numpy as np

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    u = torch.randn(3, 7, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gru = models.GRU(4, 2, seed=3)
    with torch.no_grad():
        gru.b.copy_(0.1 * torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    W, U, b = (p.detach().numpy() for p in (gru.W, gru.U, gru.b))
    n = 4

    def gru_step(h, x):
        z = sig(W[:n] @ h.T + U[:n] @ x.T + b[:n, None]).T
        r = sig(W[n : 2 * n] @ h.T + U[n : 2 * n] @ x.T + b[n : 2 * n, None]).T
        cand = np.tanh(W[2 * n :] @ (r * h).T + U[2 * n :] @ x.T + b[2 * n :, None]).T
        return (1 - z) * h + z * cand

    want = _numpy_trajectory(gru_step, u.numpy(), n)
    np.testing.assert_allclose(gru(u).detach().numpy(), want, rtol=1e-12, atol=1e-14)

    rnn = models.DiscreteRNN(4, 2, seed=2)
    with torch.no_grad():
        rnn.b.fill_(0.05)
    W, U, b = (p.detach().numpy() for p in (rnn.W, rnn.U, rnn.b))
    want = _numpy_trajectory(lambda h, x: np.tanh(h @ W.T + x @ U.T + b), u.numpy(), n)
    np.testing.assert_allclose(rnn(u).detach().numpy(), want, rtol=1e-12, atol=1e-14)


def test_state_dicts_naming_the_old_input_weight_still_load():
    """The CTRNN's and the normal forms' input weight is ``U`` (``B`` before 0.2, which clashed
    with the batch size); a checkpoint written with ``B`` loads into ``U``."""
    fold = models.ContinuousNormalForm("saddle_node", mu=0.1, input_size=1)
    for model in (models.CTRNN(3, 2, seed=0), fold):
        old = {("B" if k == "U" else k): v + 1.0 for k, v in model.state_dict().items()}
        assert "B" in old and "U" not in old
        model.load_state_dict(old)
        torch.testing.assert_close(model.U.detach(), old["B"])
