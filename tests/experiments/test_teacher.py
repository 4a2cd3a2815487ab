"""Student–teacher experiment: detectors on hand-made series, spectra against dense references,
and a short end-to-end run that checks the qualitative findings on the default seed."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from lanczos_ntk.experiments import teacher as T
from lanczos_ntk.testing import dense_gram

TINY = T.TeacherConfig(
    state_size=4, trials=4, trial_steps=10, num_steps=1, top_k=4, landscape_points=4, landscape_steps=30
)


def test_detect_crossing_hand_made():
    steps = [0, 2, 4, 6, 8, 10]
    lead = [-0.3, -0.1, 0.1, 0.3, -0.2, 0.2]
    stable = [1, 1, 2, 2, 1, 2]
    c = T.detect_crossing(steps, lead, stable)
    assert c.step == pytest.approx(3.0)
    assert c.index == 2
    assert c.stable_change_step == 4
    assert c.recrossings == 1


def test_detect_crossing_none_and_threshold():
    assert T.detect_crossing([0, 1, 2], [-1.0, -0.5, -0.1]).step is None
    assert T.detect_crossing([0, 1, 2], [0.5, 0.6, 0.7]).step is None  # starts unstable
    c = T.detect_crossing([0, 1], [0.5, 1.5], threshold=1.0)  # a map's |μ| = 1
    assert c.step == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same length"):
        T.detect_crossing([0, 1], [0.0])


def test_collapse_steps_and_spikes():
    out = T.collapse_steps([0, 1, 2, 3, 4], [5.0, 4.5, 3.0, 2.0, 2.5])
    assert out["min_step"] == 3 and out["steepest_step"] == 1.5
    assert out["half_step"] == pytest.approx(1 + 1.0 / 1.5)
    assert T.count_spikes([1.0, 0.1, 0.01, 1.0, 0.5, 0.01, 0.001, 1.0]) == 2
    assert T.count_spikes([1.0, 0.5, 0.2, 0.1]) == 0


def test_config_validation():
    with pytest.raises(ValueError, match="optimizer"):
        T.TeacherConfig(optimizer="adam")
    with pytest.raises(ValueError, match="record_every"):
        T.TeacherConfig(record_every=0)


def test_problem_is_a_pitchfork_pair():
    prob = T.build_problem(T.TeacherConfig())
    n = prob.student.state_size
    eye = torch.eye(n, dtype=torch.float64)
    lead_s = torch.linalg.eigvals(-eye + prob.student.W.detach()).real.max()
    lead_t = torch.linalg.eigvals(-eye + prob.teacher.W.detach()).real.max()
    assert float(lead_s) == pytest.approx(-0.4, abs=1e-9)
    assert float(lead_t) == pytest.approx(1.0, abs=1e-9)
    again = T.build_problem(T.TeacherConfig())
    assert torch.equal(prob.W0, again.W0)  # same seed, same numbers


@pytest.mark.parametrize(
    "architecture, student, teacher", [("ctrnn", -0.4, 1.0), ("rnn", 0.6, 2.0), ("gru", 0.8, 1.5)]
)
def test_every_architecture_puts_the_pitchfork_at_factor_one(architecture, student, teacher):
    """The trivial point's leading eigenvalue (flow) or multiplier (map) from a jacrev of the
    one-step update written out here, independently of the models' rhs."""
    from torch.func import jacrev

    cfg = T.TeacherConfig(architecture=architecture)
    prob = T.build_problem(cfg)
    n = cfg.state_size
    x = torch.zeros(n, dtype=torch.float64)
    for model, want in ((prob.student, student), (prob.teacher, teacher)):
        W = model.W.detach()
        if architecture == "ctrnn":
            A = jacrev(lambda h, W=W: -h + W @ torch.tanh(h))(x)
        elif architecture == "rnn":
            A = jacrev(lambda h, W=W: torch.tanh(W @ h))(x)
        else:  # zero gates: z = r = 1/2, h' = h/2 + tanh(W_h h / 2)/2
            A = jacrev(lambda h, W=W: 0.5 * h + 0.5 * torch.tanh(W[2 * n :] @ (0.5 * h)))(x)
        ev = torch.linalg.eigvals(A)
        top = ev[int(torch.argmax(ev.real))]
        assert abs(top.imag) < 1e-12 and float(top.real) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize("architecture", ["rnn", "gru"])
def test_maps_record_against_dense_gram(architecture):
    cfg = dataclasses.replace(TINY, architecture=architecture, spectrum="dense")
    res = T.run_student_teacher(cfg)
    prob = T.build_problem(cfg)
    lam = torch.linalg.eigvalsh(dense_gram(prob.student, prob.inputs)).flip(0)
    torch.testing.assert_close(res.eigenvalues[0], lam[: cfg.top_k], rtol=1e-7, atol=1e-9)
    # a map's leading value is |μ| - 1 at the trivial point: the multiplier 0.6 or 0.8
    assert float(res.leading[0]) == pytest.approx(-0.4 if architecture == "rnn" else -0.2, abs=1e-9)


def test_recorded_directions_against_dense_truth():
    """d̂ᵀ G d̂, the gradient's cosines with g and d, and the (W, B) block of G, from a dense G
    (jacrev), the autograd gradient and critical_direction at the origin."""
    from lanczos_ntk.channels import critical_direction

    cfg = dataclasses.replace(TINY, spectrum="dense")
    res = T.run_student_teacher(cfg)
    prob = T.build_problem(cfg)
    G = dense_gram(prob.student, prob.inputs)
    cd = critical_direction(prob.student, torch.zeros(cfg.state_size, dtype=torch.float64))
    d = cd.d[:, 0] / cd.d[:, 0].norm()
    assert float(res.sensitivity_eigenvalue[0]) == pytest.approx(float(d @ G @ d), rel=1e-9)
    loss = ((prob.student(prob.inputs) - prob.targets) ** 2).mean()
    grad = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(prob.student.parameters()))])
    grad = grad / grad.norm()
    g = cd.g[:, 0] / cd.g[:, 0].norm()
    assert float(res.gradient_sensitivity_cos[0]) == pytest.approx(float((d @ grad).abs()), rel=1e-9)
    assert float(res.gradient_channel_cos[0]) == pytest.approx(float((g @ grad).abs()), abs=1e-12)
    nb = cfg.state_size * (cfg.state_size + 1)  # W and B lead the parameter vector
    GB = G[:nb, :nb]
    lb, VB = torch.linalg.eigh(GB)
    assert float(res.block_participation[0]) == pytest.approx(float(lb.sum() ** 2 / (lb**2).sum()), rel=1e-9)
    db = cd.d[:nb, 0]
    assert float(res.block_sensitivity_cos[0]) == pytest.approx(
        float((db @ VB[:, -1]).abs() / db.norm()), rel=1e-9
    )
    assert res.update_bias_share.shape == (cfg.num_steps,)


@pytest.mark.parametrize("spectrum", ["dense", "lanczos"])
def test_recorded_eigenvalues_match_dense_gram(spectrum):
    cfg = dataclasses.replace(TINY, spectrum=spectrum, tol=1e-10)
    res = T.run_student_teacher(cfg)
    prob = T.build_problem(cfg)  # the student at step 0
    G = dense_gram(prob.student, prob.inputs)
    lam = torch.linalg.eigvalsh(G).flip(0)
    torch.testing.assert_close(res.eigenvalues[0], lam[: cfg.top_k], rtol=1e-7, atol=1e-9)
    pos = lam.clamp_min(0)
    pr = float(pos.sum() ** 2 / (pos**2).sum())
    if spectrum == "dense":
        assert float(res.participation[0]) == pytest.approx(pr, rel=1e-10)
    else:  # SLQ estimate
        assert float(res.participation[0]) == pytest.approx(pr, rel=0.3)
    assert res.loss.shape == (cfg.num_steps + 1,)
    assert res.steps.tolist() == [0, 1]


def test_result_round_trip(tmp_path):
    res = T.run_student_teacher(TINY)
    res.save(tmp_path / "r")
    back = T.StudentTeacherResult.load(tmp_path / "r")
    assert back.config == res.config
    torch.testing.assert_close(back.eigenvalues, res.eigenvalues)
    assert back.crossing == res.crossing
    # files written when the experiment lived at lanczos_ntk.teacher still load
    meta_path = tmp_path / "r.json"
    text = meta_path.read_text()
    assert "lanczos_ntk.experiments.teacher:StudentTeacherResult" in text
    meta_path.write_text(text.replace("lanczos_ntk.experiments.teacher:", "lanczos_ntk.teacher:"))
    old = T.StudentTeacherResult.load(tmp_path / "r")
    assert old.config == res.config and type(old.crossing) is type(res.crossing)


def test_old_attribute_path_warns_and_gives_the_same_module():
    import lanczos_ntk

    with pytest.warns(DeprecationWarning, match="lanczos_ntk.experiments.teacher"):
        old = lanczos_ntk.teacher
    assert old is T
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        lanczos_ntk.nope  # noqa: B018


def test_end_to_end_default_seed():
    """Collapse within a few steps of the learned pitchfork; the channel is the top direction;
    LRNG beats spiking SGD at lr = 0.5."""
    cfg = T.TeacherConfig(num_steps=16, compare_steps=60, compare_record_every=60)
    res = T.run_student_teacher(cfg)
    c = res.crossing
    assert c.step is not None and 5 < c.step < 12
    assert c.stable_change_step is not None and abs(c.stable_change_step - c.step) <= 2
    assert res.participation[0] > 4.5 and res.collapse["min_value"] < 2.5
    assert abs(res.collapse["min_step"] - c.step) <= 5
    assert abs(res.collapse["half_step"] - c.step) <= 5
    assert float(res.channel_cos[c.index]) > 0.99
    # training moves along d (the unfolding direction), never along g (the odd problem's
    # gradient has no bias component: round-off only), and the (W, B) block collapses onto d
    before = slice(0, c.index)
    assert float(res.gradient_channel_cos[before].max()) < 1e-12
    assert float(res.gradient_sensitivity_cos[before].min()) > 0.9
    assert float(res.sensitivity_eigenvalue[c.index - 1]) > 10 * float(res.sensitivity_eigenvalue[0])
    assert float(res.block_sensitivity_cos[c.index - 1]) > 0.95
    assert float(res.block_participation[c.index - 1]) < 0.5 * float(res.block_participation[0])
    comp = T.compare_optimizers(cfg)
    assert comp.sgd.spikes >= 1 and comp.lrng.spikes == 0
    # the SGD spike is the biases: a round-off seed grown along the amplified g channel
    assert T.spike_bias_share(comp.sgd) > 0.9
    assert float(comp.sgd.update_bias_share[:5].max()) < 1e-12
    assert comp.lrng.final_loss < 1e-2 * comp.sgd.final_loss
    assert math.isfinite(comp.overhead)


def test_landscape_follows_inverse_square():
    cfg = T.TeacherConfig(
        landscape_points=6,
        landscape_steps=400,
        landscape_mu_min=0.05,
        landscape_mu_max=0.5,
        landscape_fit_min=8.0,
    )
    prob = T.build_problem(cfg)
    theta = torch.cat([p.detach().reshape(-1) for p in prob.student.parameters()])
    # move the student close to the crossing along W (gain factor 0.9 instead of 0.6)
    n = cfg.state_size
    theta[: n * n] *= 0.9 / 0.6
    land = T.channel_landscape(cfg, theta)
    assert land.slope == pytest.approx(1.0, rel=0.3)  # λ_c(s) ≈ λ_c(0) + s: linear, unit slope
    assert -2.3 < land.exponent < -1.6
    # along the paper's direction d the kernel grows like the transient law (δ⁻³), and the
    # scalar pitchfork normal form driven by the same pulses follows it
    assert -3.3 < land.exponent_d < -2.6
    assert math.isfinite(land.ratio_d) and 0.3 < land.ratio_d < 3
    assert land.lambda_bif[land.mu > 0].max() > land.lambda_bif[land.mu < 0].max() / 10


def test_cli_writes_results_and_figures(tmp_path):
    from click.testing import CliRunner

    from lanczos_ntk.cli._teacher import teacher_command

    out = tmp_path / "run"
    args = [
        "--out",
        str(out),
        "--quiet",
        "--steps",
        "3",
        "--lr",
        "0.5",
        "--set",
        "num_steps=3",
        "--set",
        "trials=4",
        "--set",
        "trial_steps=10",
        "--set",
        "landscape_points=3",
        "--set",
        "landscape_steps=20",
        "--set",
        "compare_record_every=3",
    ]
    res = CliRunner().invoke(teacher_command, args)
    assert res.exit_code == 0, res.output
    for name in ("collapse", "landscape", "comparison"):
        assert (out / "results" / f"{name}.json").exists()
        assert (out / "results" / f"{name}.npz").exists()
    for name in ("collapse", "landscape", "optimizers"):
        assert (out / "figures" / f"{name}.png").exists()
        assert (out / "figures" / f"{name}.pdf").exists()
    comp = T.OptimizerComparison.load(out / "results" / "comparison")
    assert comp.lr == 0.5 and comp.sgd.loss.shape == (4,)
    again = CliRunner().invoke(teacher_command, args)  # resumes from the saved results
    assert again.exit_code == 0, again.output
    bad = CliRunner().invoke(
        teacher_command, ["--out", str(tmp_path / "x"), "--quiet", "--set", "optimizer=adam"]
    )
    assert bad.exit_code == 2 and "optimizer" in bad.output
    assert not (tmp_path / "x").exists()  # nothing written for a refused configuration


def test_seed_study_rows_and_spread():
    cfg = dataclasses.replace(TINY, num_steps=2)
    study = T.run_seeds(cfg, seeds=(0, 1), architectures=("ctrnn", "rnn"), landscape=False, compare=False)
    assert [(r["architecture"], r["seed"]) for r in study.rows] == [
        ("ctrnn", 0),
        ("ctrnn", 1),
        ("rnn", 0),
        ("rnn", 1),
    ]
    sp = study.spread(("pr_initial",))
    for arch in ("ctrnn", "rnn"):
        vals = [r["pr_initial"] for r in study.rows if r["architecture"] == arch]
        assert sp[arch]["pr_initial"]["n"] == 2
        assert sp[arch]["pr_initial"]["mean"] == pytest.approx(sum(vals) / 2)
        assert sp[arch]["pr_initial"]["min"] == min(vals)
    with pytest.raises(ValueError, match="architectures"):
        T.run_seeds(cfg, architectures=("lstm",))
    with pytest.raises(ValueError, match="architecture"):
        T.TeacherConfig(architecture="lstm")


def test_cli_seed_study_saves_each_run_and_resumes(tmp_path):
    import json

    from click.testing import CliRunner

    from lanczos_ntk.cli._teacher import teacher_command

    out = tmp_path / "study"
    args = [
        "--out",
        str(out),
        "--optimizer",
        "sgd",
        "--seeds",
        "0,1",
        "--architectures",
        "ctrnn,rnn",
        "--set",
        "num_steps=2",
        "--set",
        "trials=4",
        "--set",
        "trial_steps=10",
        "--set",
        "landscape_points=3",
        "--set",
        "landscape_steps=20",
    ]
    res = CliRunner().invoke(teacher_command, args)
    assert res.exit_code == 0, res.output
    study = json.loads((out / "study.json").read_text())
    assert [(r["architecture"], r["seed"]) for r in study["rows"]] == [
        ("ctrnn", 0),
        ("ctrnn", 1),
        ("rnn", 0),
        ("rnn", 1),
    ]
    assert study["spread"]["rnn"]["pr_initial"]["n"] == 2
    assert "|cos(gradient, d)| before the crossing" in res.output
    for arch in ("ctrnn", "rnn"):
        assert (out / "results" / f"study-{arch}-1.json").exists()
    again = CliRunner().invoke(teacher_command, args)
    assert again.exit_code == 0 and json.loads((out / "study.json").read_text()) == study
    for args, word in (
        (["--seeds", "0", "--architectures", "lstm"], "architectures"),
        (["--seeds", "a,b"], "seeds"),
    ):
        bad = CliRunner().invoke(teacher_command, ["--out", str(tmp_path / "x"), *args])
        assert bad.exit_code == 2 and word in bad.output
        assert not (tmp_path / "x").exists()  # refused before anything is written
