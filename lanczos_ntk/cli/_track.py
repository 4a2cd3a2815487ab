"""``lanczos-ntk track``: train the student–teacher problem with the kernel tracker on.

Each (architecture, seed) run, and its control (a teacher that needs no bifurcation), is saved
in the run folder as it finishes (re-running resumes), drawn as a time series (top eigenvalues,
participation rank, the leading eigenvalue with the estimated crossing step and the warnings,
alignments), and summarised: the actual crossing, the first warning, the lead time, the
estimate at the warning, the false alarms of the controls and the tracker's overhead.
"""

from __future__ import annotations

import dataclasses
import math
import sys

import click

from ._app import experiment_options, friendly, main, run_folder
from ._runs import ConfigError
from ._teacher import _config, _study_plan

__all__ = ["track_command"]


@main.command("track")
@experiment_options("runs/track", "num_steps=60")
@click.option(
    "--seeds",
    "seeds_text",
    default="0",
    show_default=True,
    metavar="S1,S2,...",
    help="Seeds of the problem (one run each).",
)
@click.option(
    "--architectures",
    "arch_text",
    default="ctrnn",
    show_default=True,
    metavar="A1,A2,...",
    help="ctrnn, rnn, gru (comma-separated).",
)
@click.option(
    "--horizon",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Warn when the crossing is estimated fewer steps ahead.",
)
@click.option(
    "--every",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Training steps between records.",
)
@click.option(
    "--controls/--no-controls",
    default=True,
    show_default=True,
    help="Also run each seed with a teacher below the critical gain (false alarms).",
)
@click.option(
    "--model",
    "model_spec",
    metavar="SPEC",
    help="Train your own model instead: a built-in name or package.module:factory / "
    "path/to/file.py:factory (with --inputs and --targets; --set lr=..., "
    "num_steps=...).",
)
@click.option(
    "--inputs",
    "inputs_file",
    type=click.Path(dir_okay=False),
    help="With --model: inputs [trials, steps, d_in] (.pt, .npy, .npz).",
)
@click.option(
    "--targets",
    "targets_file",
    type=click.Path(dir_okay=False),
    help="With --model: target states [trials, steps, n] (.pt, .npy, .npz).",
)
@friendly
def track_command(
    out,
    config_file,
    overrides,
    seeds_text,
    arch_text,
    horizon,
    every,
    controls,
    fresh,
    quiet,
    model_spec,
    inputs_file,
    targets_file,
):
    """Train a student with the kernel tracker on: early warning of its bifurcation."""
    from tqdm import tqdm

    from ..experiments import teacher as T

    if model_spec or inputs_file or targets_file:
        return _own_model(
            out, config_file, overrides, model_spec, inputs_file, targets_file, horizon, every, fresh, quiet
        )

    seeds, archs = _study_plan(seeds_text, arch_text)
    cfg = _config(config_file, overrides, None, None, None, "sgd")
    record = {
        **dataclasses.asdict(cfg),
        "seeds": seeds,
        "architectures": archs,
        "horizon": horizon,
        "every": every,
        "controls": controls,
    }
    plan = [(a, s, c) for a in archs for s in seeds for c in ((False, True) if controls else (False,))]
    rows = []
    with run_folder("track", record, out, fresh, quiet) as run:
        bar = tqdm(total=len(plan), disable=quiet, file=sys.stderr, desc="track", unit="run")
        for arch, seed, control in plan:
            c = dataclasses.replace(cfg, architecture=arch, seed=seed)
            name = f"{arch}-{seed}{'-control' if control else ''}"
            res = run.cached(
                name,
                lambda c=c, control=control: T.run_tracked(c, horizon=horizon, every=every, control=control),
                f"tracked run {name}",
            )
            _figure(run, name, res.track, horizon)
            rows.append(_row(name, res.track, arch=arch, seed=seed, control=control))
            bar.update()
        bar.close()
        summary = {
            "rows": rows,
            "false_alarms": sum(1 for r in rows if r["control"] and r["first_warning"] is not None),
            "controls": sum(1 for r in rows if r["control"]),
            "missed": sum(
                1
                for r in rows
                if not r["control"]
                and r["crossing_step"] is not None
                and (r["lead_time"] is None or r["lead_time"] <= 0)
            ),
        }
        run.write_json("summary.json", summary)
        run.log("done")
        _report(rows, summary, run, quiet)


def _report(rows, summary, run, quiet) -> None:
    if quiet:
        return
    click.echo(
        f"{'run':22s} {'crossing':>9s} {'warning':>8s} {'lead':>6s} {'lead/run':>8s} "
        f"{'estimate':>9s} {'overhead':>8s}"
    )
    for r in rows:
        click.echo(
            f"{r['run']:22s} {_fmt(r['crossing_step']):>9s} "
            f"{_fmt(r['first_warning']):>8s} {_fmt(r['lead_time']):>6s} "
            f"{_fmt(r['lead_fraction'], '.0%'):>8s} "
            f"{_fmt(r['estimate_at_warning']):>9s} {r['overhead']:>7.1f}x"
        )
    if summary.get("controls"):
        click.echo(
            f"false alarms: {summary['false_alarms']} of {summary['controls']} control "
            f"runs; crossings without an earlier warning: {summary['missed']}"
        )
    click.echo(
        "legend: crossing = step where the tracked fixed point's leading eigenvalue "
        "reaches the stability boundary; lead = crossing - first warning; estimate = the "
        "crossing step estimated at the first warning; overhead = (training + "
        "recording) / training time"
    )
    click.echo(f"results: {run.path}")


def _row(name, tr, **extra) -> dict:
    lead = tr.lead_time
    return {
        "run": name,
        **extra,
        "crossing_step": tr.crossing_step,
        "first_warning": tr.first_warning,
        "lead_time": lead,
        "lead_fraction": None if lead is None else lead / tr.num_steps,
        "estimate_at_warning": tr.estimate_at_warning,
        "overhead": tr.overhead,
    }


def _figure(run, name, tr, horizon) -> None:
    import matplotlib.pyplot as plt

    from .. import plotting

    axes = plotting.plot_track(
        tr.records,
        crossing=tr.crossing_step,
        title=f"{name}: crossing {_fmt(tr.crossing_step)}, first warning "
        f"{_fmt(tr.first_warning)} (horizon {horizon:g})",
    )
    fig = axes[0].figure
    fig.tight_layout()
    run.save_figure(fig, name)
    plt.close(fig)


def _own_model(
    out, config_file, overrides, model_spec, inputs_file, targets_file, horizon, every, fresh, quiet
):
    """``--model``: train the user's model on its inputs and targets with the tracker on."""
    import torch

    from ..track import train_tracked
    from ._runs import build_model, load_config, load_inputs, merge_config, parse_overrides

    if not (model_spec and inputs_file and targets_file):
        raise ConfigError(
            "--model, --inputs and --targets go together: the model, its inputs "
            "[trials, steps, d_in] and the target states [trials, steps, n]"
        )
    from ._config import defaults_for

    defaults = {
        "lr": 0.1,
        "num_steps": 40,
        "seed": 0,
        "model": {**defaults_for("spectrum")["model"], "name": model_spec},
    }
    layers = [load_config(config_file)] if config_file else []
    cfg = merge_config(defaults, *layers, parse_overrides(overrides))
    if not float(cfg["lr"]) > 0 or int(cfg["num_steps"]) < 1:
        raise ConfigError(f"expected lr > 0 and num_steps >= 1, got {cfg['lr']} and {cfg['num_steps']}")
    model = build_model(cfg["model"], dtype=torch.float64)
    d_in = getattr(model, "input_size", None)
    inputs = load_inputs(inputs_file, None if d_in is None else int(d_in), dtype=torch.float64)
    targets = load_inputs(targets_file, None, dtype=torch.float64)
    with torch.no_grad():
        states = model(inputs)
    states = states[0] if isinstance(states, tuple) else states
    if tuple(states.shape) != tuple(targets.shape):  # before anything is written
        raise ConfigError(
            f"{targets_file}: expected targets of the states' shape "
            f"{list(states.shape)} [trials, steps, n], got {list(targets.shape)}"
        )
    record = {
        **cfg,
        "inputs": str(inputs_file),
        "targets": str(targets_file),
        "horizon": horizon,
        "every": every,
    }
    with run_folder("track", record, out, fresh, quiet) as run:
        tr = run.cached(
            "model",
            lambda: train_tracked(
                model,
                inputs,
                targets,
                lr=float(cfg["lr"]),
                num_steps=int(cfg["num_steps"]),
                every=every,
                horizon=horizon,
                generator=torch.Generator().manual_seed(int(cfg["seed"])),
            ),
            f"tracked training of {model_spec}",
        )
        _figure(run, "model", tr, horizon)
        rows = [_row("model", tr)]
        summary = {"rows": rows}
        run.write_json("summary.json", summary)
        run.log("done")
        _report(rows, summary, run, quiet)


def _fmt(v, spec: str = ".1f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)
