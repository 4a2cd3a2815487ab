"""Data-parallel products over a gloo process group (two CPU processes) against one process."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lanczos_ntk as lnk
from lanczos_ntk import models

F64 = torch.float64
B, T = 6, 5


def _problem():
    model = models.GRU(3, 2, seed=0)
    u = torch.randn(B, T, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    X = torch.randn(
        sum(p.numel() for p in model.parameters()), 3, generator=torch.Generator().manual_seed(2), dtype=F64
    )
    return model, u, X


def _on_rank(rank, world, folder, job):
    """A spawned rank: join the gloo group, build the operator on this rank's share of the
    trials, run ``job(K, rank, folder)`` (which saves its results), then leave cleanly."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world)
    try:
        model, u, _ = _problem()
        mine = u[rank * B // world : (rank + 1) * B // world]
        job(lnk.StateNTK(model, mine, process_group=dist.group.WORLD), rank, folder)
        # every rank done with its collectives before any tears gloo down: a rank that
        # destroys the group while its peer still talks to it can abort at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the results are on disk: leave without interpreter finalisation, where gloo's worker
    # threads have been seen to abort the process ("terminate called without an active
    # exception") after everything was done
    os._exit(0)


def _gram_and_top(K, rank, folder):
    _, _, X = _problem()
    GX = K.dual().matmul(X)
    top = lnk.eigsh(K, k=3, tol=1e-10, generator=torch.Generator().manual_seed(0))
    # eigenvectors of K itself: each rank its rows of J x / sqrt(λ)
    prim = lnk.eigsh(K, k=2, tol=1e-10, return_eigenvectors=True, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="process group"):
        lnk.eigsh(K, k=1, side="primal")
    torch.save(
        {
            "GX": GX,
            "top": top.eigenvalues,
            "side": top.side,
            "Y": prim.eigenvectors,
            "Y_values": prim.eigenvalues,
            "Y_residuals": prim.residuals,
            "Y_side": prim.side,
            "Y_dimension": prim.dimension,
        },
        os.path.join(folder, f"rank{rank}.pt"),
    )


def test_two_ranks_give_the_global_gram_and_spectrum(tmp_path):
    mp.spawn(_on_rank, args=(2, str(tmp_path), _gram_and_top), nprocs=2, join=True)
    model, u, X = _problem()
    G = lnk.testing.dense_gram(model, u)
    top = torch.linalg.eigvalsh(G).flip(0)[:3]
    outs = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    for out in outs:
        assert torch.linalg.norm(out["GX"] - G @ X) <= 1e-10 * torch.linalg.norm(G @ X)
        torch.testing.assert_close(out["top"], top, rtol=1e-9, atol=0)
        assert out["side"] == "dual"
        assert out["Y_side"] == "primal" and out["Y_dimension"] == B * T * 3
    # the ranks' rows, stacked in rank order, are eigenvectors of the dense K of all trials
    Kd = lnk.testing.dense_ntk(model, u)
    Y, lam = torch.cat([o["Y"] for o in outs]), outs[0]["Y_values"]
    assert [o["Y"].shape[0] for o in outs] == [B * T * 3 // 2] * 2
    torch.testing.assert_close(lam, top[:2], rtol=1e-9, atol=0)
    torch.testing.assert_close(Y.T @ Y, torch.eye(2, dtype=F64), rtol=0, atol=1e-8)
    true_res = torch.linalg.norm(Kd @ Y - Y * lam, dim=0)
    assert float(true_res.max()) <= 1e-8 * float(lam[0])
    torch.testing.assert_close(outs[0]["Y_residuals"], true_res, rtol=1e-3, atol=1e-9 * float(lam[0]))


def test_process_group_needs_an_initialised_backend():
    model, u, _ = _problem()
    with pytest.raises(ValueError, match="init_process_group"):
        lnk.StateNTK(model, u, process_group=object())


def _estimates(K):
    """Every spectral estimator on one operator, each from the same seeded generator."""

    def g():
        return torch.Generator().manual_seed(7)

    vecs = lnk.eigsh(K.dual(), k=2, tol=1e-10, return_eigenvectors=True, generator=g())
    sign = torch.sign(vecs.eigenvectors[0:1])  # eigenvectors up to sign
    slq = lnk.slq(K, num_probes=4, num_steps=12, generator=g())
    return {
        "values": vecs.eigenvalues,
        "vectors": vecs.eigenvectors * sign,
        "trace": torch.tensor(lnk.trace(K, num_matvecs=12, generator=g()).estimate),
        "nodes": slq.nodes,
        "weights": slq.weights,
        "rank": torch.tensor(lnk.effective_rank(K, num_probes=4, num_steps=12, generator=g()).value),
        "channel": _channel_numbers(K),
        # M of the whole dataset (zero mass counts M - P zeros), not this rank's rows
        "M": torch.tensor(
            [K.total_states, lnk.eigsh(K, k=1, generator=g()).primal_dimension, slq.primal_dimension]
        ),
    }


def _channel_numbers(K):
    """A channel report along two fixed parameter directions (a Hopf-like rank-2 channel)."""
    P = K.dual().shape[0]
    g = torch.randn(P, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    r = lnk.channels.channel_report(K, g, generator=torch.Generator().manual_seed(7))
    return torch.tensor(
        [r.lambda_max, r.lambda_bif, r.lambda_res, r.trace, r.trace_bif, r.alignment], dtype=F64
    )


def _save_estimates(K, rank, folder):
    torch.save(_estimates(K), os.path.join(folder, f"est{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_every_estimator_over_ranks_matches_one_process(tmp_path, world):
    """Eigenvectors (dual side), SLQ, Hutch++ trace and effective rank over 2 and 3 ranks give
    what one process gives on all trials (identical probes on every rank), to rounding."""
    mp.spawn(_on_rank, args=(world, str(tmp_path), _save_estimates), nprocs=world, join=True)
    model, u, _ = _problem()
    one = _estimates(lnk.StateNTK(model, u))
    G = lnk.testing.dense_gram(model, u)
    torch.testing.assert_close(one["values"], torch.linalg.eigvalsh(G).flip(0)[:2], rtol=1e-9, atol=0)
    # the channel numbers of one process against the dense Jacobian
    J = lnk.testing.dense_jacobian(model, u)
    Q = torch.linalg.qr(torch.randn(G.shape[0], 2, generator=torch.Generator().manual_seed(5), dtype=F64)).Q
    JQ = J @ Q
    u1 = torch.linalg.eigh(J @ J.T).eigenvectors[:, -1]
    align = torch.linalg.norm(torch.linalg.qr(JQ).Q.T @ u1)
    res = torch.linalg.eigvalsh(G - G @ Q @ Q.T - Q @ Q.T @ G + Q @ Q.T @ G @ Q @ Q.T).max()
    want = torch.stack(
        [
            torch.linalg.eigvalsh(G).max(),
            torch.linalg.eigvalsh(JQ.T @ JQ).max(),
            res,
            G.trace(),
            (JQ**2).sum(),
            align,
        ]
    )
    torch.testing.assert_close(one["channel"], want, rtol=1e-7, atol=1e-9)
    assert one["M"].tolist() == [B * T * 3] * 3  # B·T·n, n = 3 units
    for rank in range(world):
        got = torch.load(tmp_path / f"est{rank}.pt", weights_only=True)
        for key, want in one.items():
            torch.testing.assert_close(got[key], want, rtol=1e-8, atol=1e-10, msg=key)


def _lrng_steps(model, u, group=None, steps=4):
    """A few low-rank natural-gradient steps; the loss sums over this process's trials."""
    target = torch.randn(B, T, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    lo = 0
    if group is not None:
        r, n = dist.get_rank(), dist.get_world_size()
        lo = r * B // n
    target = target[lo : lo + u.shape[0]]
    opt = lnk.optim.LowRankNaturalGradient(
        model, u, lr=0.05, rank=2, refresh_every=2, tol=1e-10, process_group=group
    )
    for _ in range(steps):
        opt.zero_grad()
        ((model(u) - target) ** 2).sum().backward()
        opt.step()
    return {
        "params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
        "eigenvalues": opt.eigenvalues,
    }


def _save_lrng(K, rank, folder):
    model, u, _ = _problem()
    n = dist.get_world_size()
    mine = u[rank * B // n : (rank + 1) * B // n]
    torch.save(_lrng_steps(model, mine, dist.group.WORLD), os.path.join(folder, f"lrng{rank}.pt"))


def test_low_rank_natural_gradient_over_ranks_matches_one_process(tmp_path):
    """Gradients and preconditioner reduced over the ranks: the same steps as one process on
    all trials (and every rank holds the same parameters)."""
    mp.spawn(_on_rank, args=(2, str(tmp_path), _save_lrng), nprocs=2, join=True)
    model, u, _ = _problem()
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    one = _lrng_steps(model, u)
    assert float((one["params"] - start).abs().max()) > 1e-3  # it did move
    for rank in range(2):
        got = torch.load(tmp_path / f"lrng{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["params"], one["params"], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got["eigenvalues"], one["eigenvalues"], rtol=1e-8, atol=0)


def _compare_problem():
    model = models.CTRNN(3, 1, gain=0.9, seed=0).double()
    h0 = 0.05 * torch.randn(B, 3, generator=torch.Generator().manual_seed(4), dtype=F64)
    return model, torch.zeros(B, 40, 1, dtype=F64), h0


def _compare_numbers(K, model):
    cd = lnk.channels.critical_direction(model, torch.zeros(3, dtype=F64))
    c = lnk.channels.compare_channels(K, cd, generator=torch.Generator().manual_seed(0))
    return torch.tensor(
        [
            c.g.lambda_bif,
            c.d.lambda_bif,
            c.joint.lambda_bif,
            c.g.lambda_max,
            c.g.trace,
            c.g.alignment,
            c.predicted_g,
            c.predicted_d,
            c.predicted_joint,
            c.static_law,
            c.transient_law,
            c.kick,
            c.nonlinearity,
        ],
        dtype=F64,
    )


def _save_compare(K, rank, folder):
    model, u, h0 = _compare_problem()
    n = dist.get_world_size()
    sl = slice(rank * B // n, (rank + 1) * B // n)
    K = lnk.StateNTK(model, u[sl], h0=h0[sl], process_group=dist.group.WORLD)
    torch.save(_compare_numbers(K, model), os.path.join(folder, f"compare{rank}.pt"))


def test_compare_channels_over_ranks_matches_one_process(tmp_path):
    """The channel comparison's measurements and predictions count every rank's trials."""
    mp.spawn(_on_rank, args=(2, str(tmp_path), _save_compare), nprocs=2, join=True)
    model, u, h0 = _compare_problem()
    one = _compare_numbers(lnk.StateNTK(model, u, h0=h0), model)
    for rank in range(2):
        got = torch.load(tmp_path / f"compare{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, one, rtol=1e-7, atol=1e-12)


def _tracker_records(model, u, group=None):
    target = 0.5 * torch.randn(B, T, 3, generator=torch.Generator().manual_seed(6), dtype=F64)
    if group is not None:
        n = dist.get_world_size()
        r = dist.get_rank()
        target = target[r * B // n : (r + 1) * B // n]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tracker = lnk.track.KernelTracker(model, u, every=2, k=2, process_group=group)
    for step in range(5):
        opt.zero_grad()
        loss = ((model(u) - target) ** 2).sum()
        tracker.step(step, loss)
        loss.backward()
        if group is not None:
            for p in model.parameters():
                dist.all_reduce(p.grad, group=group)
        opt.step()
    rec = tracker.records
    return torch.cat(
        [
            rec.eigenvalues.reshape(-1),
            rec.residuals.reshape(-1),
            rec.participation,
            rec.participation_se,
            rec.leading,
            rec.channel_cos,
            rec.sensitivity_cos,
            rec.gradient_channel_cos,
            rec.gradient_sensitivity_cos,
        ]
    )


def _save_tracker(K, rank, folder):
    model, u, _ = _problem()
    n = dist.get_world_size()
    torch.save(
        _tracker_records(model, u[rank * B // n : (rank + 1) * B // n], dist.group.WORLD),
        os.path.join(folder, f"track{rank}.pt"),
    )


def test_tracker_over_ranks_matches_one_process(tmp_path):
    """The kernel tracker over 2 ranks (each its trials, gradients summed) records what one
    process records on all trials."""
    mp.spawn(_on_rank, args=(2, str(tmp_path), _save_tracker), nprocs=2, join=True)
    model, u, _ = _problem()
    one = _tracker_records(model, u)
    assert bool(torch.isfinite(one).all())
    for rank in range(2):
        got = torch.load(tmp_path / f"track{rank}.pt", weights_only=True)
        torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-9)
