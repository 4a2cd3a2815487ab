"""The lanczos-ntk command line on tiny settings (click's CliRunner, Agg backend)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import lanczos_ntk as lnk
from lanczos_ntk.cli import main
from lanczos_ntk.cli._config import defaults_for
from lanczos_ntk.cli._runs import ConfigError, dump_toml, load_config, merge_config, parse_overrides

MODEL_TINY = ["--set", "model.state_size=4", "--set", "inputs.trials=2", "--set", "inputs.steps=6"]
SPEC_TINY = [
    "--threads",
    "1",
    "--set",
    "spectrum.k=2",
    "--set",
    "spectrum.bottom=1",
    "--set",
    "spectrum.num_probes=2",
    "--set",
    "spectrum.num_steps=5",
    "--set",
    "density.num_points=50",
]
TINY = MODEL_TINY + SPEC_TINY
TINY_SWEEP = TINY + [
    "--set",
    "dynamics.seeds=4",
    "--set",
    "dynamics.max_steps=30",
    "--set",
    "sweep.num=3",
    "--set",
    "sweep.start=0.5",
    "--set",
    "sweep.stop=1.5",
    "--set",
    "sweep.densities=2",
]


def run(args, expect=0):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def figures(folder):
    return sorted(p.name for p in (folder / "figures").iterdir())


# ------------------------------------------------------------------------------ commands
def test_help_lists_every_command():
    out = run(["--help"]).output
    for name in ("demo", "spectrum", "density", "sweep", "bifurcate"):
        assert name in out
        assert "Usage" in run([name, "--help"]).output


def test_python_dash_m_runs_the_command_line():
    """``python -m lanczos_ntk`` (and ``python -m lanczos_ntk.cli``) is the ``lanczos-ntk`` command."""
    for module in ("lanczos_ntk", "lanczos_ntk.cli"):
        done = subprocess.run(
            [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "Usage: lanczos-ntk" in done.stdout and "spectrum" in done.stdout


def test_spectrum_writes_config_results_figures_and_log(tmp_path):
    out = tmp_path / "spec"
    res = run(["spectrum", *TINY, "--seed", "3", "--out", str(out)])
    assert "top eigenvalues" in res.output and str(out) in res.output
    assert "legend: participation rank" in res.output  # the summary says what its ranks mean
    assert {"config.toml", "config.json", "run.log", "summary.json"} <= {p.name for p in out.iterdir()}
    assert figures(out) == ["spectrum.pdf", "spectrum.png"]
    summary = lnk.load_result(out / "results" / "spectrum")
    assert summary.top.eigenvalues.shape == (2,) and summary.top.eigenvalues[0] > 0
    assert isinstance(lnk.load_result(out / "results" / "density"), lnk.SpectralDensity)
    metrics = json.loads((out / "summary.json").read_text())
    assert metrics["dimension_M"] == 2 * 6 * 4 and metrics["condition_number"] >= 1
    assert load_config(out / "config.toml")["seed"] == 3
    # the same command again resumes: nothing recomputed
    run(["spectrum", *TINY, "--seed", "3", "--out", str(out)])
    assert "loaded from the previous run" in (out / "run.log").read_text()


def test_density_linear_and_log(tmp_path):
    out = tmp_path / "dens"
    run(["density", *TINY, "--quiet", "--out", str(out)])
    lin = lnk.load_result(out / "results" / "density_linear")
    log = lnk.load_result(out / "results" / "density_log")
    assert lin.scale == "linear" and log.scale == "log"
    assert figures(out) == ["density.pdf", "density.png"]


def test_bifurcate_pitchfork_normal_form(tmp_path):
    out = tmp_path / "bif"
    res = run(
        ["bifurcate", "--set", "bifurcate.seeds=8", "--set", "bifurcate.max_steps=200", "--out", str(out)]
    )
    assert "branch_point" in res.output
    summary = json.loads((out / "summary.json").read_text())
    kinds = [b["kind"] for b in summary["bifurcations"]]
    # one event: the bifurcating branch's turning point at μ = 0 is the branch point itself
    assert kinds == ["branch_point"], kinds
    assert "fold" not in res.output
    p = [b["p"] for b in summary["bifurcations"] if b["kind"] == "branch_point"]
    assert min(abs(v) for v in p) < 1e-6
    assert figures(out) == ["bifurcation.pdf", "bifurcation.png"]


def test_bifurcate_says_where_the_euler_map_loses_stability(tmp_path):
    """Hopf normal form simulated with dt = 0.2: the flow's Hopf point is at μ = 0, the Euler
    map's (|1 + dt(μ + i)| = 1) at μ = (√(1 - dt²) - 1)/dt ≈ -0.101, where the kernel sees it."""
    out = tmp_path / "hopf"
    res = run(
        [
            "bifurcate",
            "--set",
            "model.form=hopf",
            "--set",
            "model.dt=0.2",
            "--set",
            "bifurcate.seeds=8",
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert [b["kind"] for b in summary["bifurcations"]] == ["hopf"]
    assert abs(summary["bifurcations"][0]["p"]) < 1e-8
    assert summary["euler_map"]["dt"] == 0.2
    (mu_e,) = summary["euler_map"]["stability_changes"]
    assert mu_e == pytest.approx((math.sqrt(1 - 0.2**2) - 1) / 0.2, abs=1e-3)
    assert "Euler map" in res.output and f"{mu_e:.5g}" in res.output


def test_sweep_gain_marks_the_bifurcation(tmp_path):
    out = tmp_path / "sw"
    res = run(
        [
            "sweep",
            *TINY_SWEEP,
            "--set",
            "sweep.relative_to_critical=true",
            "--set",
            "dynamics.input=zero",
            "--out",
            str(out),
        ]
    )
    sweep = lnk.load_result(out / "results" / "sweep")
    assert sweep.values.shape == (3,) and sweep.eigenvalues.shape == (3, 2)
    assert abs(sweep.values[1] / sweep.critical_value - 1.0) < 1e-12
    kinds = {b["kind"] for b in sweep.bifurcations}
    assert kinds & {"branch_point", "hopf"}, sweep.bifurcations
    assert "bifurcation:" in res.output
    # one event, one number: the change between sweep points is the located bifurcation
    assert "stability_change" not in kinds, sweep.bifurcations
    located = [b for b in sweep.bifurcations if "sweep_interval" in b]
    assert located and all(
        b["sweep_interval"][0] - 1e-9 <= b["p"] <= b["sweep_interval"][1] + 1e-9 for b in located
    )
    assert "between sweep points" not in res.output
    assert "overview.png" in figures(out) and "bifurcation.pdf" in figures(out)
    points = [lnk.load_result(out / "results" / f"point-{i:03d}") for i in range(3)]
    assert [p.value for p in points] == sweep.values.tolist()


def test_demo_on_tiny_settings(tmp_path):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    res = run(["demo", *TINY_SWEEP, "--set", "sweep.start=0.8", "--set", "sweep.stop=1.2", "--out", str(out)])
    assert torch.get_num_threads() == threads  # the demo's single thread is not left behind
    assert "λ_max grows" in res.output and "overview.png" in res.output
    assert {"overview.png", "overview.pdf", "densities.png", "bifurcation.png"} <= set(figures(out))
    sweep = lnk.load_result(out / "results" / "sweep")
    assert sweep.param == "gain" and sweep.values.shape == (3,)


def test_sweep_resumes_only_missing_points(tmp_path):
    out = tmp_path / "sw"
    args = ["sweep", *TINY_SWEEP, "--set", "dynamics.continuation=false", "--quiet", "--out", str(out)]
    run(args)
    res = out / "results"
    before = {i: os.stat(res / f"point-{i:03d}.json").st_mtime_ns for i in range(3)}
    for ext in ("json", "npz"):
        (res / f"point-001.{ext}").unlink()
    time.sleep(0.01)
    run(args)
    after = {i: os.stat(res / f"point-{i:03d}.json").st_mtime_ns for i in range(3)}
    assert after[0] == before[0] and after[2] == before[2]
    assert (res / "point-001.json").exists()
    log = (out / "run.log").read_text()
    assert len(re.findall(r"point-001 .*computed", log)) == 2
    assert len(re.findall(r"point-000 .*loaded from the previous run", log)) == 1
    assert not list(res.glob("*.tmp")) and not list(res.glob(".*"))


def test_sweep_interrupted_by_ctrl_c_resumes(tmp_path, monkeypatch):
    import lanczos_ntk.cli._sweep as sweep_module

    real = sweep_module.spectral_summary
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "sw"
    args = ["sweep", *TINY_SWEEP, "--set", "dynamics.continuation=false", "--quiet", "--out", str(out)]
    monkeypatch.setattr(sweep_module, "spectral_summary", interrupted)
    res = CliRunner().invoke(main, args)
    assert res.exit_code != 0  # aborted
    saved = sorted(p.name for p in (out / "results").iterdir())
    assert saved == ["point-000.json", "point-000.npz", "point-001.json", "point-001.npz"]
    monkeypatch.setattr(sweep_module, "spectral_summary", real)
    run(args)
    log = (out / "run.log").read_text()
    assert "point-000 (gain=0.5): loaded" in log and "point-001 (gain=1): loaded" in log
    assert len(re.findall(r"point-002 .*computed", log)) == 1


def test_changed_config_is_refused_unless_fresh(tmp_path):
    out = tmp_path / "spec"
    run(["spectrum", *TINY, "--quiet", "--out", str(out)])
    res = run(["spectrum", *TINY, "--seed", "7", "--quiet", "--out", str(out)], expect=2)
    assert "--fresh" in res.output and "seed" in res.output
    run(["spectrum", *TINY, "--seed", "7", "--quiet", "--fresh", "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["seed"] == 7
    assert "loaded from the previous run" not in (out / "run.log").read_text()


def test_sweep_over_checkpoints(tmp_path):
    model = lnk.models.CTRNN(4, 1, seed=0)
    paths = []
    for i, scale in enumerate((0.5, 1.0)):
        state = {k: v * scale if k == "W" else v for k, v in model.state_dict().items()}
        paths.append(tmp_path / f"ck{i}.pt")
        torch.save(state, paths[-1])
    out = tmp_path / "ck"
    run(
        [
            "sweep",
            *TINY_SWEEP,
            "--checkpoints",
            str(paths[0]),
            "--checkpoints",
            str(paths[1]),
            "--quiet",
            "--out",
            str(out),
        ]
    )
    sweep = lnk.load_result(out / "results" / "sweep")
    assert sweep.param == "checkpoints" and sweep.labels == ["ck0.pt", "ck1.pt"]
    assert sweep.branch is None


def test_user_factory_and_inputs_file(tmp_path):
    (tmp_path / "mymodel.py").write_text(
        "import lanczos_ntk as lnk\ndef build(n=3):\n    return lnk.models.DiscreteRNN(n, 2, seed=1)\n"
    )
    u = np.random.default_rng(0).normal(size=(2, 5, 2))
    np.savez(tmp_path / "u.npz", inputs=u)
    out = tmp_path / "user"
    run(
        [
            "spectrum",
            "--model",
            f"{tmp_path / 'mymodel.py'}:build",
            "--set",
            "model.kwargs.n=3",
            "--inputs",
            str(tmp_path / "u.npz"),
            *SPEC_TINY,
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert json.loads((out / "summary.json").read_text())["dimension_M"] == 2 * 5 * 3
    torch.save(torch.as_tensor(u), tmp_path / "u.pt")
    run(
        [
            "density",
            "--model",
            f"{tmp_path / 'mymodel.py'}:build",
            "--inputs",
            str(tmp_path / "u.pt"),
            *SPEC_TINY,
            "--quiet",
            "--out",
            str(tmp_path / "user2"),
        ]
    )


# ---------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "case",
    [
        "unknown_key",
        "missing_inputs",
        "wrong_shape",
        "bad_model",
        "bad_type",
        "bad_set",
        "missing_checkpoint",
        "unknown_param",
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, case):
    out = tmp_path / "run"
    args = ["spectrum", *TINY]
    if case == "unknown_key":
        (tmp_path / "c.toml").write_text("[model]\nstate_sise = 4\n")
        args += ["--config", str(tmp_path / "c.toml")]
        needle = "state_sise"
    elif case == "missing_inputs":
        args += ["--inputs", str(tmp_path / "nope.pt")]
        needle = "nope.pt"
    elif case == "wrong_shape":
        torch.save(torch.zeros(2, 5, 3, dtype=torch.float64), tmp_path / "u.pt")
        args += ["--inputs", str(tmp_path / "u.pt")]
        needle = "shape"
    elif case == "bad_model":
        args += ["--model", "no_such_package_xyz.mod:factory"]
        needle = "no_such_package_xyz"
    elif case == "bad_type":
        args += ["--set", "spectrum.k=many"]
        needle = "spectrum.k"
    elif case == "bad_set":
        args += ["--set", "nonsense"]
        needle = "KEY=VALUE"
    elif case == "missing_checkpoint":
        args = ["sweep", *TINY_SWEEP, "--checkpoints", str(tmp_path / "gone.pt")]
        needle = "gone.pt"
    else:
        args = ["sweep", *TINY_SWEEP, "--param", "lambda"]
        needle = "lambda"
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and needle in lines[0], res.output
    assert not out.exists()


def test_warnings_go_to_the_log(tmp_path, monkeypatch):
    import warnings

    import lanczos_ntk.cli._sweep as sweep_module

    real = sweep_module.spectral_summary

    def noisy(*args, **kwargs):
        warnings.warn("loss of orthogonality (test)", UserWarning, stacklevel=1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "spectral_summary", noisy)
    out = tmp_path / "sw"
    res = run(["sweep", *TINY_SWEEP, "--set", "dynamics.continuation=false", "--out", str(out)])
    assert "warning(s) during the run" in res.output
    assert "warning (3x) UserWarning: loss of orthogonality (test)" in (out / "run.log").read_text()


def test_non_run_folder_is_not_overwritten(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    res = CliRunner().invoke(main, ["spectrum", *TINY, "--out", str(tmp_path)])
    assert res.exit_code == 2 and "not a run folder" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# ------------------------------------------------------------------------------- config
def test_config_round_trip_and_overrides(tmp_path):
    cfg = defaults_for("sweep")
    cfg = merge_config(
        cfg,
        parse_overrides(
            ["model.gain=1.5", "sweep.values=[1, 2.5]", "model.name=pkg.mod:f", "model.kwargs.width=3"]
        ),
    )
    assert cfg["model"]["gain"] == 1.5 and cfg["sweep"]["values"] == [1, 2.5]
    assert cfg["model"]["kwargs"] == {"width": 3}
    (tmp_path / "c.toml").write_text(dump_toml(cfg))
    assert load_config(tmp_path / "c.toml") == cfg
    assert merge_config(defaults_for("sweep"), load_config(tmp_path / "c.toml")) == cfg
    with pytest.raises(ConfigError, match="unknown configuration key 'model.bogus'"):
        merge_config(cfg, {"model": {"bogus": 1}})


def test_example_experiments_are_valid():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[2] / "experiments"
    mine = ("demo", "spectrum", "density", "sweep", "bifurcate")
    files = sorted(f for f in folder.glob("*.toml") if f.stem in mine)
    assert {f.stem for f in files} == set(mine)
    for f in files:
        merge_config(defaults_for(f.stem), load_config(f))


def test_printed_ranks_and_trace_match_the_dense_kernel_near_collapse(tmp_path):
    """The numbers the CLI prints, against eigvalsh of the dense kernel it describes."""
    from lanczos_ntk.cli._app import model_and_inputs
    from lanczos_ntk.testing import dense_gram

    out = tmp_path / "spec"
    args = [
        "spectrum",
        "--threads",
        "1",
        "--set",
        "model.state_size=8",
        "--set",
        "model.gain=2.5",
        "--set",
        "inputs.trials=2",
        "--set",
        "inputs.steps=40",
        "--set",
        "spectrum.k=3",
        "--set",
        "spectrum.bottom=0",
        "--set",
        "spectrum.num_probes=8",
        "--set",
        "spectrum.num_steps=20",
        "--set",
        "density.points=50",
        "--out",
        str(out),
    ]
    res = run(args)
    m = json.loads((out / "summary.json").read_text())
    model, inputs = model_and_inputs(json.loads((out / "config.json").read_text()))
    lam = torch.linalg.eigvalsh(dense_gram(model, inputs)).clamp_min(0)
    p = lam[lam > 0] / lam.sum()
    truth = {
        "participation_rank": float(lam.sum() ** 2 / (lam**2).sum()),
        "entropy_rank": float(torch.exp(-(p * p.log()).sum())),
        "trace": float(lam.sum()),
    }
    assert truth["participation_rank"] < 2.5  # the collapsed regime
    for key, value in truth.items():
        se = m["trace_se" if key == "trace" else key + "_se"]
        assert abs(m[key] - value) <= 3 * se + 1e-9 * value, (key, m[key], se, value)
    assert f"participation {m['participation_rank']:.4g} ±" in res.output


def test_bad_run_settings_exit_2_with_one_line_and_write_nothing(tmp_path):
    out = tmp_path / "spec"
    res = CliRunner().invoke(main, ["spectrum", *TINY, "--set", "spectrum.k=100000", "--out", str(out)])
    assert res.exit_code == 2 and "spectrum.k=100000 exceeds" in res.output
    assert not out.exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(main, ["spectrum", *TINY, "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "cannot write the run folder" in res.output
    assert "Traceback" not in res.output


def test_non_finite_inputs_and_weights_are_named():
    model = lnk.models.CTRNN(3, 1, seed=0).double()
    u = torch.zeros(2, 4, 1, dtype=torch.float64)
    u[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"inputs\[1, 2, 0\].*not finite"):
        lnk.StateNTK(model, u)
    with torch.no_grad():
        model.W[0, 1] = float("inf")
    with pytest.raises(ValueError, match="'W' has 1 non-finite"):
        lnk.StateNTK(model, torch.zeros(2, 4, 1, dtype=torch.float64))


def test_ctrl_c_during_a_sweep_says_how_to_resume(tmp_path, monkeypatch):
    from lanczos_ntk.cli import _sweep

    real, calls = _sweep.spectral_summary, []

    def interrupted_on_the_second_point(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(_sweep, "spectral_summary", interrupted_on_the_second_point)
    out = tmp_path / "sweep"
    res = CliRunner().invoke(main, ["sweep", *TINY_SWEEP, "--out", str(out)])
    assert res.exit_code == 130 and "to resume" in res.output
    assert "interrupted" in (out / "run.log").read_text()
    monkeypatch.setattr(_sweep, "spectral_summary", real)
    run(["sweep", *TINY_SWEEP, "--out", str(out)])
    assert "1 loaded" in (out / "run.log").read_text() or "resumed" in (out / "run.log").read_text()


def test_a_model_with_the_wrong_input_size_names_what_it_expects(tmp_path):
    (tmp_path / "wrongsize.py").write_text(
        "import torch\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.rnn = torch.nn.RNN(5, 4, batch_first=True)\n"
        "    def forward(self, u):\n"
        "        return self.rnn(u)[0]\n"
        "def build():\n"
        "    return M()\n"
    )
    np.save(tmp_path / "u.npy", np.zeros((2, 4, 3)))
    res = CliRunner().invoke(
        main,
        [
            "spectrum",
            "--model",
            f"{tmp_path / 'wrongsize.py'}:build",
            *SPEC_TINY,
            "--inputs",
            str(tmp_path / "u.npy"),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert res.exit_code == 2, res.output
    assert "takes 5 input features" in res.output


def test_resume_recomputes_a_truncated_point(tmp_path):
    out = tmp_path / "sweep"
    run(["sweep", *TINY_SWEEP, "--out", str(out)])
    point = sorted((out / "results").glob("point-*.json"))[1]
    point.write_text(point.read_text()[:40])  # a crash mid-write of an older version, an edit
    run(["sweep", *TINY_SWEEP, "--out", str(out)])
    log = (out / "run.log").read_text()
    assert f"{point.stem}: unreadable" in log and "recomputed" in log
    assert lnk.load_result(point.with_suffix("")).spectrum.top.eigenvalues.numel() == 2


def test_model_package_in_the_working_directory_and_text_inputs(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        "import lanczos_ntk as lnk\n"
        "def build(state_size=4, input_size=1, **kwargs):\n"
        "    return lnk.models.CTRNN(state_size, input_size, seed=0)\n"
    )
    monkeypatch.chdir(tmp_path)  # importable from here, as `python -m` would have it
    run(["spectrum", "--model", "mypkg.models:build", *TINY, "--quiet", "--out", "out"])
    res = CliRunner().invoke(main, ["spectrum", "--model", "nopkg.models:build", "--out", "o2"])
    assert res.exit_code == 2 and "path/to/models.py:build" in res.output
    (tmp_path / "u.txt").write_text("not a tensor")
    res = CliRunner().invoke(main, ["spectrum", *TINY, "--inputs", "u.txt", "--out", "o3"])
    assert res.exit_code == 2 and ".npy or .npz" in res.output
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


def test_old_configuration_key_names_are_still_read(tmp_path):
    old = [
        "spectrum",
        *MODEL_TINY,
        "--threads",
        "1",
        "--set",
        "spectrum.k=2",
        "--set",
        "spectrum.bottom=0",
        "--set",
        "spectrum.probes=2",
        "--set",
        "spectrum.lanczos_steps=5",
        "--set",
        "density.points=50",
    ]
    res = CliRunner().invoke(main, [*old, "--out", str(tmp_path / "old")])
    assert res.exit_code == 0, res.output
    assert "spectrum.probes is now called spectrum.num_probes" in res.output
    cfg = load_config(tmp_path / "old" / "config.toml")
    assert cfg["spectrum"]["num_probes"] == 2 and cfg["density"]["num_points"] == 50
    assert "probes" not in cfg["spectrum"]
    both = CliRunner().invoke(main, [*old, "--set", "spectrum.num_probes=3", "--out", str(tmp_path / "both")])
    assert both.exit_code == 2 and "same key" in both.output
    assert not (tmp_path / "both").exists()


def test_run_folder_records_only_the_model_keys_in_use(tmp_path):
    res = CliRunner().invoke(main, ["spectrum", *TINY, "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    model = load_config(tmp_path / "c" / "config.toml")["model"]
    assert model["name"] == "ctrnn" and "gain" in model and "dt" in model
    assert not {"form", "mu", "kind", "kwargs"} & set(model)
    # the recorded file runs again as a configuration, into the same folder (a resume)
    again = CliRunner().invoke(
        main, ["spectrum", "--config", str(tmp_path / "c" / "config.toml"), "--out", str(tmp_path / "c")]
    )
    assert again.exit_code == 0, again.output
    bif = CliRunner().invoke(
        main,
        [
            "bifurcate",
            "--set",
            "bifurcate.seeds=4",
            "--set",
            "bifurcate.max_steps=50",
            "--out",
            str(tmp_path / "b"),
        ],
    )
    assert bif.exit_code == 0, bif.output
    model = load_config(tmp_path / "b" / "config.toml")["model"]
    assert {"form", "kind", "mu", "dt"} <= set(model) and "gain" not in model


@pytest.mark.parametrize(
    "command",
    [
        ["teacher", "--optimizer", "sgd", "--set", "num_steps=2"],
        ["landscapes", "--steps", "2", "--mu", "-0.1,0.1,3", "--alpha", "-0.1,0.1,3"],
    ],
)
def test_every_command_shares_the_run_folder_handling(tmp_path, monkeypatch, command):
    """teacher and landscapes answer an unwritable --out and Ctrl-C as the other commands do."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    res = CliRunner().invoke(main, [*command, "--out", str(blocker / "run")])
    assert res.exit_code == 2 and "cannot write the run folder" in res.output
    assert "Traceback" not in res.output and "Usage:" not in res.output

    from lanczos_ntk import landscape
    from lanczos_ntk.experiments import teacher

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher, "run_student_teacher", interrupted)
    monkeypatch.setattr(landscape, "normal_form_landscape", interrupted)
    out = tmp_path / "run"
    res = CliRunner().invoke(main, [*command, "--out", str(out)])
    assert res.exit_code == 130 and f"--out {out}" in res.output
    assert "interrupted" in (out / "run.log").read_text()


def test_run_folder_results_name_a_public_type_and_old_files_load(tmp_path):
    """A sweep's saved points name ``lanczos_ntk.experiments.sweep:SweepPoint``; files naming the
    paths used before (``lanczos_ntk.cli``, ``lanczos_ntk.cli._compute``) load the same."""
    import json

    out = tmp_path / "sweep"
    run(["sweep", *TINY_SWEEP, "--out", str(out)])
    path = sorted((out / "results").glob("point-*.json"))[0]
    meta = json.loads(path.read_text())
    assert meta["type"] == "lanczos_ntk.experiments.sweep:SweepPoint"
    assert meta["fields"]["spectrum"]["__result__"] == "lanczos_ntk.experiments.sweep:SpectralSummary"
    before = lnk.load_result(path.with_suffix(""))
    for old in ("lanczos_ntk.cli", "lanczos_ntk.cli._compute"):
        meta["type"] = f"{old}:SweepPoint"
        meta["fields"]["spectrum"]["__result__"] = f"{old}:SpectralSummary"
        path.write_text(json.dumps(meta))
        again = lnk.load_result(path.with_suffix(""))
        assert type(again) is type(before) and again.value == before.value
        assert type(again.spectrum) is type(before.spectrum)
