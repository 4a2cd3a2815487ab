"""The training tracker: records against dense computations, crossing estimates against closed
forms, the warning, and subtask interference against finite loss differences."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import lanczos_ntk as lnk
from lanczos_ntk import models, track

F64 = torch.float64


def _one_unit(w: float, b: float):
    m = models.CTRNN(1, 1, seed=0)
    with torch.no_grad():
        m.W.fill_(w)
        m.b.fill_(b)
        m.U.fill_(0.5)
    return m


def test_records_match_dense_references(tmp_path):
    model = models.CTRNN(4, 1, gain=0.8, seed=1)
    u = 0.3 * torch.randn(3, 15, 1, generator=torch.Generator().manual_seed(0), dtype=F64)
    target = torch.randn(3, 15, 4, generator=torch.Generator().manual_seed(1), dtype=F64)
    # solved at every record (track_tol tiny), and tracked by subspace steps (the default)
    tracker = track.KernelTracker(model, u, every=2, k=3, tol=1e-10, num_probes=16, track_tol=1e-12)
    tracked = track.KernelTracker(model, u, every=2, k=3, num_probes=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dense = []
    for step in range(5):
        opt.zero_grad()
        loss = ((model(u) - target) ** 2).sum()
        row = tracker.step(step, loss)
        tracked.step(step)
        assert (row is None) == (step % 2 == 1)
        if row is not None:
            J = lnk.testing.dense_jacobian(model, u)
            G = J.T @ J
            lam, V = torch.linalg.eigh(G)
            grad = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
            # the fixed point near 0 at zero input, by scipy from 0, and its leading eigenvalue
            W, b = model.W.detach().numpy(), model.b.detach().numpy()
            x = scipy.optimize.fsolve(lambda x, W=W, b=b: -x + W @ np.tanh(x) + b, np.zeros(4))
            for _ in range(3):  # Newton polish
                x = x - np.linalg.solve(
                    -np.eye(4) + W * (1 - np.tanh(x) ** 2)[None, :], -x + W @ np.tanh(x) + b
                )
            A = -np.eye(4) + W * (1 - np.tanh(x) ** 2)[None, :]
            lead = float(np.linalg.eigvals(A).real.max())
            dense.append(
                (lam.flip(0), V[:, -1], torch.cat([g.reshape(-1) for g in grad]), lead, torch.from_numpy(x))
            )
        if row is not None:
            params_at_last = [p.detach().clone() for p in model.parameters()]
        loss.backward()
        opt.step()
    rec = tracker.records
    assert rec.steps.tolist() == [0, 2, 4]
    fast = tracked.records
    for r, (lam, _, _, lead, _) in enumerate(dense):
        torch.testing.assert_close(rec.eigenvalues[r], lam[:3], rtol=1e-8, atol=0)
        # a Ritz value lies within its residual of an eigenvalue (here: of its own)
        assert bool(((fast.eigenvalues[r] - lam[:3]).abs() <= fast.residuals[r] + 1e-9).all())
        assert bool((fast.residuals[r] <= 1e-2 * lam[0]).all())
        pr = float(lam.sum() ** 2 / (lam**2).sum())
        assert abs(rec.participation[r] - pr) <= 3 * rec.participation_se[r] + 1e-6 * pr
        assert float(rec.leading[r]) == pytest.approx(lead, abs=1e-8)
        # alignments are cosines of unit vectors: within [0, 1]
        assert 0.0 <= float(rec.channel_cos[r]) <= 1.0 + 1e-12
        assert 0.0 <= float(rec.gradient_sensitivity_cos[r]) <= 1.0 + 1e-12
    # the gradient projection against the dense gradient and d = dλ_c/dθ
    for p, v in zip(model.parameters(), params_at_last):
        p.data.copy_(v)
    cd = lnk.channels.critical_direction(model, dense[-1][4])
    d = cd.d[:, 0] / torch.linalg.vector_norm(cd.d[:, 0])
    g = dense[-1][2] / torch.linalg.vector_norm(dense[-1][2])
    assert float(rec.gradient_sensitivity_cos[-1]) == pytest.approx(float((d @ g).abs()), rel=1e-8)
    assert float(rec.sensitivity_cos[-1]) == pytest.approx(float((d @ dense[-1][1]).abs()), rel=1e-6)
    rec.save(tmp_path / "track")
    again = lnk.load_result(tmp_path / "track")
    assert torch.equal(again.eigenvalues, rec.eigenvalues) and again.kind == "flow"


def test_crossing_step_at_a_branch_point_is_exact():
    """1-unit CTRNN, b = 0: λ_c = -1 + w at h = 0, so with w = 0.5 + 0.01 s the crossing is at
    s* = 50 exactly, and the linear estimate finds it from any records."""
    model = _one_unit(0.5, 0.0)
    u = torch.zeros(2, 10, 1, dtype=F64)
    tracker = track.KernelTracker(model, u, k=1, window=3)
    for s in (0, 10, 20):
        with torch.no_grad():
            model.W.fill_(0.5 + 0.01 * s)
        tracker.record(s)
    rec = tracker.records
    torch.testing.assert_close(rec.leading, torch.tensor([-0.5, -0.4, -0.3], dtype=F64), rtol=0, atol=1e-10)
    assert float(rec.estimated_linear[-1]) == pytest.approx(50.0, abs=1e-6)
    assert float(rec.steps_left[-1]) <= 30.0 + 1e-6  # the warning's estimate errs early


def test_crossing_step_at_a_fold_from_the_closed_form():
    """1-unit CTRNN with w = 2 driven by b = -0.8 + 0.01 s: its lower stable branch folds where
    sech² h = 1/w, h_f = -arccosh(√2), b_f = h_f - w tanh h_f; λ_c ∝ √(s* - s) there, so the
    fold estimate converges to s* as the records approach it (the linear one to about twice
    the distance)."""
    w = 2.0
    h_f = -math.acosh(math.sqrt(w))
    b_f = h_f - w * math.tanh(h_f)
    s_star = (b_f + 0.8) / 0.01
    model = _one_unit(w, -0.8)
    u = torch.zeros(2, 10, 1, dtype=F64)
    tracker = track.KernelTracker(model, u, k=1, window=3, horizon=20.0)
    errors = []
    with pytest.warns(track.BifurcationWarning, match="cross the stability boundary") as caught:
        for s in range(0, int(s_star) - 1, 4):
            with torch.no_grad():
                model.b.fill_(-0.8 + 0.01 * s)
            tracker.record(s)
            est = tracker.records.estimated_fold[-1]
            if math.isfinite(float(est)):
                errors.append((s_star - s, abs(float(est) - s_star)))
    rec = tracker.records
    assert bool((rec.leading < 0).all())  # never past the fold: the branch is tracked
    # the error shrinks faster than the distance: 28% of the 5.3 steps left at the last record
    # (λ_c bends towards the fold: √ only close to it), against 160% for the linear estimate
    rel = [e / left for left, e in errors if left < 60]
    assert all(a > b for a, b in zip(rel, rel[1:])) and rel[-1] < 0.35
    last_left = s_star - float(rec.steps[-1])
    assert float(rec.estimated_linear[-1]) - s_star > 1.5 * last_left
    # the warning (horizon 20) came before the fold
    hits = [c for c in caught if issubclass(c.category, track.BifurcationWarning)]
    assert hits and rec.first_warning is not None and rec.first_warning < s_star
    assert len(hits) == int(rec.warned.sum())  # one warning per warned record


def test_no_warning_far_from_a_bifurcation():
    model = _one_unit(0.2, 0.0)
    u = torch.zeros(2, 10, 1, dtype=F64)
    tracker = track.KernelTracker(model, u, k=1, horizon=50.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", track.BifurcationWarning)
        for s in range(0, 50, 10):
            with torch.no_grad():
                model.W.fill_(0.2 - 0.001 * s)  # moving away from the boundary
            tracker.record(s)
    assert tracker.records.first_warning is None


def test_estimate_crossing_closed_forms_and_input_checks():
    s = torch.arange(0.0, 40.0, 10.0)
    e = track.estimate_crossing(s, -0.02 * (50 - s))  # linear: crossing at 50
    assert e.linear == pytest.approx(50.0) and e.step == pytest.approx(min(e.linear, e.fold))
    e = track.estimate_crossing(s, -torch.sqrt(0.01 * (80 - s)))  # fold: crossing at 80
    assert e.fold == pytest.approx(80.0)
    e = track.estimate_crossing(s, -0.5 * torch.ones(4), 1.0 / (0.01 * (60 - s)) ** 2)
    assert e.kernel == pytest.approx(60.0) and math.isnan(e.linear)
    with pytest.raises(ValueError, match="window"):
        track.estimate_crossing(s, s, window=1)
    with pytest.raises(ValueError, match="same length"):
        track.estimate_crossing(s, s[:2])


def test_interference_predicts_finite_loss_changes():
    """Two subtasks (different trials and units): ΔL_b after a small step on L_a, predicted as
    -η ∇_h L_bᵀ K ∇_h L_a, against the actual change of the loss."""
    model = models.CTRNN(4, 1, gain=1.1, seed=2)
    u = 0.5 * torch.randn(4, 12, 1, generator=torch.Generator().manual_seed(3), dtype=F64)
    target = torch.randn(4, 12, 4, generator=torch.Generator().manual_seed(4), dtype=F64)
    masks = [torch.zeros(4, 12, 4, dtype=F64), torch.zeros(4, 12, 4, dtype=F64)]
    masks[0][:2, :, :2] = 1.0
    masks[1][1:, :, 1:] = 1.0

    def losses(m):
        h = m(u)
        return [((h - target) ** 2 * mk).sum() for mk in masks]

    h = model(u).detach()
    state_grads = [2 * (h - target) * mk for mk in masks]
    inter = track.interference(lnk.StateNTK(model, u), state_grads, names=["a", "b"])
    assert torch.allclose(inter.matrix, inter.matrix.T, rtol=1e-10)
    lr = 1e-6
    actual = torch.zeros(2, 2, dtype=F64)
    base = [float(v.detach()) for v in losses(model)]
    for a in range(2):
        m = models.CTRNN(4, 1, gain=1.1, seed=2)
        grads = torch.autograd.grad(losses(m)[a], list(m.parameters()))
        with torch.no_grad():
            for p, g in zip(m.parameters(), grads):
                p.sub_(lr * g)
        after = losses(m)
        for b in range(2):
            actual[b, a] = float(after[b].detach()) - base[b]
    pred = inter.predicted(lr)
    assert bool((torch.sign(pred) == torch.sign(actual)).all())
    torch.testing.assert_close(pred, actual, rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="M = 192"):
        track.interference(lnk.StateNTK(model, u), [torch.zeros(5)])


def test_bad_tracker_input():
    model = models.CTRNN(2, 1, seed=0)
    u = torch.zeros(1, 3, 1, dtype=F64)
    for kw, msg in (({"every": 0}, "every"), ({"horizon": -1.0}, "horizon"), ({"window": 1}, "window")):
        with pytest.raises(ValueError, match=msg):
            track.KernelTracker(model, u, **kw)
    with pytest.raises(ValueError, match="rhs"):
        track.KernelTracker(torch.nn.RNN(1, 2, batch_first=True).double(), u, dynamics=True)


def test_the_warning_precedes_the_students_crossing_and_controls_stay_silent():
    from lanczos_ntk.experiments import teacher

    cfg = teacher.TeacherConfig(num_steps=12, seed=0)
    run = teacher.run_tracked(cfg, horizon=10.0, every=2).track
    assert run.crossing_step is not None and run.first_warning is not None
    assert run.first_warning < run.crossing_step and run.lead_time > 0
    assert abs(run.estimate_at_warning - run.crossing_step) < 0.5 * run.crossing_step
    # the actual crossing: where the line through the records around the sign change hits 0
    lead, steps = run.records.leading.tolist(), run.records.steps.tolist()
    i = next(j for j in range(1, len(lead)) if lead[j - 1] < 0 <= lead[j])
    want = steps[i - 1] - lead[i - 1] * (steps[i] - steps[i - 1]) / (lead[i] - lead[i - 1])
    assert run.crossing_step == pytest.approx(want, rel=1e-12)
    control = teacher.run_tracked(cfg, horizon=10.0, every=2, control=True).track
    assert control.crossing_step is None and control.first_warning is None


def test_track_command_writes_resumes_and_reports(tmp_path):
    from click.testing import CliRunner

    from lanczos_ntk.cli import main

    out = tmp_path / "track"
    args = ["track", "--out", str(out), "--set", "num_steps=12", "--every", "3"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "false alarms: 0 of 1 control runs" in res.output
    summary = __import__("json").loads((out / "summary.json").read_text())
    row = summary["rows"][0]
    assert row["run"] == "ctrnn-0" and row["first_warning"] < row["crossing_step"]
    assert (out / "figures" / "ctrnn-0.png").exists() and (out / "figures" / "ctrnn-0-control.pdf").exists()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "ctrnn-0-control: loaded" not in again.output
    assert (out / "run.log").read_text().count("tracked run ctrnn-0-control") == 1  # resumed
    bad = CliRunner().invoke(main, ["track", "--architectures", "lstm", "--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "expected some of" in bad.output
    assert not (tmp_path / "b").exists()


def test_interference_concentrates_in_the_bifurcation_channel():
    """Two subtasks (the trials with negative and with positive pulses) of a 3-unit CTRNN whose
    trivial point has λ_c = -0.5, -0.1, -0.02: the share of their interference carried by the
    static channel g rises towards 1; checked against the dense Jacobian."""
    shares = []
    for lc in (-0.5, -0.1, -0.02):
        m = models.CTRNN(3, 1, seed=0)
        with torch.no_grad():
            lead = torch.linalg.eigvals(m.W).real.max()
            m.W.mul_((1 + lc) / lead)
        u = torch.zeros(6, 60, 1, dtype=F64)
        u[:, :3, 0] = 0.2 * torch.linspace(-1, 1, 6, dtype=F64)[:, None]
        h = m(u).detach()
        grads = [2 * h * (torch.arange(6)[:, None, None] < 3), 2 * h * (torch.arange(6)[:, None, None] >= 3)]
        cd = lnk.channels.critical_direction(m, torch.zeros(3, dtype=F64))
        assert cd.eigenvalue.real == pytest.approx(lc, abs=1e-9)
        inter = track.interference(lnk.StateNTK(m, u), grads, channel=cd.g)
        J = lnk.testing.dense_jacobian(m, u)
        V = J.T @ torch.stack([g.reshape(-1) for g in grads], 1)
        Q = torch.linalg.qr(cd.g).Q
        torch.testing.assert_close(inter.matrix, V.T @ V, rtol=1e-9, atol=0)
        torch.testing.assert_close(inter.channel_matrix, (Q.T @ V).T @ (Q.T @ V), rtol=1e-9, atol=0)
        shares.append(float(inter.channel_share.min()))
    assert shares[0] < shares[1] < shares[2] and shares[2] > 0.95


def test_track_command_on_your_own_model(tmp_path):
    from click.testing import CliRunner

    from lanczos_ntk.cli import main

    (tmp_path / "mine.py").write_text(
        "import lanczos_ntk as lnk\n\ndef build():\n    return lnk.models.CTRNN(3, 1, gain=0.5, seed=0)\n"
    )
    u = torch.zeros(4, 20, 1, dtype=F64)
    u[:, :3, 0] = torch.linspace(-1, 1, 4, dtype=F64)[:, None]
    teacher = models.CTRNN(3, 1, gain=1.5, seed=0)
    with torch.no_grad():
        y = teacher(u)
    torch.save(u, tmp_path / "u.pt")
    np.save(tmp_path / "y.npy", y.numpy())
    out = tmp_path / "run"
    args = [
        "track",
        "--model",
        str(tmp_path / "mine.py") + ":build",
        "--inputs",
        str(tmp_path / "u.pt"),
        "--targets",
        str(tmp_path / "y.npy"),
        "--set",
        "num_steps=6",
        "--every",
        "3",
        "--out",
        str(out),
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    row = __import__("json").loads((out / "summary.json").read_text())["rows"][0]
    assert row["run"] == "model" and (out / "figures" / "model.png").exists()
    saved = lnk.load_result(out / "results" / "model")
    assert saved.records.steps.tolist() == [0, 3, 6] and saved.loss.shape == (7,)
    bad = CliRunner().invoke(main, args[:3] + ["--out", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "go together" in bad.output
    wrong = CliRunner().invoke(
        main, [*args[:5], "--targets", str(tmp_path / "u.pt"), "--out", str(tmp_path / "c")]
    )
    assert wrong.exit_code == 2 and "targets of the states' shape" in wrong.output
    assert not (tmp_path / "c").exists()


def test_fixed_points_born_at_a_pitchfork_join_the_records():
    """1-unit CTRNN, b = 0, w = 0.6 + 0.1 s: past w = 1 the origin has the partners ±h*,
    h* = w tanh h* (closed form up to a scalar root); the periodic search finds them, the
    continued one alone does not, and the tracked point stays the origin."""
    import scipy.optimize

    model = _one_unit(0.6, 0.0)
    u = torch.zeros(3, 30, 1, dtype=F64)
    u[:, :5, 0] = torch.tensor([-1.0, 0.0, 1.0], dtype=F64)[:, None]
    every = track.KernelTracker(model, u, k=1, search_every=2)
    never = track.KernelTracker(model, u, k=1, search_every=10**6)
    for s in range(9):
        with torch.no_grad():
            model.W.fill_(0.6 + 0.1 * s)
        every.record(s)
        never.record(s)
    w = 0.6 + 0.1 * 8
    h_star = scipy.optimize.brentq(lambda h: -h + w * math.tanh(h), 0.1, 5.0)
    rec = every.records
    assert rec.num_fixed_points[:4].tolist() == [1, 1, 1, 1]  # w <= 0.9 (< 1)
    assert rec.num_fixed_points[-1] == 3 and rec.num_stable[-1] == 2
    assert never.records.num_fixed_points[-1] == 1
    assert float(rec.leading[-1]) == pytest.approx(-1 + w, abs=1e-9)  # still the origin
    found = every.fixed_points[:, 0].sort().values
    torch.testing.assert_close(found, torch.tensor([-h_star, 0.0, h_star], dtype=F64), rtol=0, atol=1e-9)
