"""``lanczos-ntk teacher``: the student–teacher collapse experiment and the optimizer comparison.

Drives :mod:`lanczos_ntk.experiments.teacher`, saves its result objects in a run folder (atomically, through
:class:`lanczos_ntk.cli._runs.RunFolder`), draws the figures (PNG + PDF) and prints a summary. The
command is ``teacher_command``; the CLI group registers it with ``main.add_command``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from ..plotting import plot_collapse, plot_landscape, plot_optimizers
from ._app import experiment_options, friendly, main, run_folder
from ._runs import ConfigError, load_config, merge_config, parse_list, parse_overrides

__all__ = ["teacher_command"]


# --------------------------------------------------------------------------------- command
def _config(config_file, overrides, seed, steps, lr, optimizer):
    from ..experiments.teacher import TeacherConfig

    defaults = dataclasses.asdict(TeacherConfig())
    layers = []
    if config_file:
        layers.append(load_config(config_file))
    if overrides:
        layers.append(parse_overrides(overrides))
    explicit = {}
    if seed is not None:
        explicit["seed"] = seed
    if optimizer in ("sgd", "lrng"):
        explicit["optimizer"] = optimizer
        if steps is not None:
            explicit["num_steps"] = steps
        if lr is not None:
            explicit["lr"] = lr
    else:
        if steps is not None:
            explicit["compare_steps"] = steps
        if lr is not None:
            explicit["compare_lr"] = lr
    cfg = merge_config(defaults, *layers, explicit)
    try:
        return TeacherConfig(**cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


# the numbers a seed study reports per architecture (mean ± std over seeds)
STUDY_KEYS = (
    ("crossing_step", "crossing step"),
    ("pr_initial", "participation ratio of G, initial"),
    ("pr_min", "participation ratio of G, minimum"),
    ("channel_cos_at_crossing", "|cos(u1, g)| at the crossing"),
    ("gradient_channel_cos_median", "|cos(gradient, g)| before the crossing"),
    ("gradient_sensitivity_cos_median", "|cos(gradient, d)| before the crossing"),
    ("sensitivity_eigenvalue_initial", "d'Gd initial"),
    ("sensitivity_eigenvalue_before_crossing", "d'Gd before the crossing"),
    ("block_participation_initial", "(W, B) block participation, initial"),
    ("block_participation_before_crossing", "(W, B) block participation, before crossing"),
    ("block_sensitivity_cos_before_crossing", "|cos(d, top of (W, B) block)| before crossing"),
    ("landscape_exponent", "landscape exponent along g"),
    ("landscape_exponent_d", "landscape exponent along d"),
    ("landscape_normal_form_exponent", "scalar normal form exponent along d"),
    ("sgd_spikes", "SGD spikes"),
    ("sgd_spike_bias_share", "bias share of the update before an SGD spike"),
    ("lrng_spikes", "LRNG spikes"),
)


def _study_plan(seeds_text, arch_text):
    """``--seeds`` and ``--architectures`` parsed, before anything is written (exit 2 if bad)."""
    from ..experiments import teacher as T

    seeds = parse_list(seeds_text, "seeds", int)
    archs = parse_list(arch_text, "architectures", str)
    bad = [a for a in archs if a not in T.ARCHITECTURES]
    if bad:
        raise ConfigError(
            f"--architectures: expected some of {', '.join(T.ARCHITECTURES)}, got {', '.join(bad)}"
        )
    return seeds, archs


def _seed_study(cfg, run, seeds, archs, optimizer, quiet, out):
    """``--seeds``: the experiment per (architecture, seed), each saved as it finishes."""
    from tqdm import tqdm

    from ..experiments import teacher as T

    bar = tqdm(
        total=len(seeds) * len(archs), disable=quiet, file=sys.stderr, desc="teacher seeds", unit="run"
    )

    def row(c, landscape, compare):
        saved = run.cached(
            f"study-{c.architecture}-{c.seed}",
            lambda: T.StudyRow(
                architecture=c.architecture, seed=c.seed, summary=T.run_summary(c, landscape, compare)
            ),
            f"study run: {c.architecture}, seed {c.seed}",
        )
        return saved.summary

    study = T.run_seeds(
        cfg,
        seeds=seeds,
        architectures=archs,
        compare=optimizer == "both",
        run=row,
        progress=lambda d, _t: (bar.update(d - bar.n), None)[1],
    )
    bar.close()
    spread = study.spread()
    run.write_json("study.json", {"rows": study.rows, "spread": spread})
    run.log("done")
    if quiet:
        return
    click.echo(f"results in {Path(out)} (study.json: every run, and the spread)")
    for arch in archs:
        n_ok = sum(1 for r in study.rows if r["architecture"] == arch and "error" not in r)
        click.echo(f"{arch}: {n_ok} of {len(seeds)} seeds (mean ± std [min, max] over seeds)")
        table = spread.get(arch, {})
        for key, label in STUDY_KEYS:
            if key in table:
                t = table[key]
                click.echo(
                    f"  {label:52s} {t['mean']:10.4g} ± {t['std']:<9.3g} "
                    f"[{t['min']:.4g}, {t['max']:.4g}] n={t['n']}"
                )
        for r in study.rows:
            if r["architecture"] == arch and "error" in r:
                click.echo(f"  seed {r['seed']}: {r['error']}")


@main.command("teacher")
@experiment_options("runs/teacher", "trials=8")
@click.option("--seed", type=int, help="Seed of the problem, eigensolver and fixed-point seeds.")
@click.option(
    "--steps", type=int, help="Training steps: of the single run (sgd|lrng) or of the comparison (both)."
)
@click.option(
    "--lr", type=float, help="Learning rate: of the single run (sgd|lrng) or of the comparison (both)."
)
@click.option(
    "--optimizer",
    type=click.Choice(["sgd", "lrng", "both"]),
    default="both",
    show_default=True,
    help="sgd|lrng: one collapse run and its landscape; both: also SGD vs LRNG.",
)
@click.option(
    "--seeds",
    "seeds_text",
    metavar="S1,S2,...",
    help="Run the experiment for each seed (and each of --architectures) and report "
    "the spread; every run is saved and resumed on its own.",
)
@click.option(
    "--architectures",
    "arch_text",
    metavar="A1,A2,...",
    default="ctrnn",
    show_default=True,
    help="With --seeds: ctrnn, rnn, gru (comma-separated).",
)
@friendly
def teacher_command(
    out, config_file, overrides, seed, steps, lr, optimizer, fresh, quiet, seeds_text, arch_text
):
    """Student learns a teacher's pitchfork: sNTK collapse, channel landscape, SGD vs LRNG."""
    import json

    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from ..experiments import teacher as T

    study = _study_plan(seeds_text, arch_text) if seeds_text else None
    cfg = _config(config_file, overrides, seed, steps, lr, optimizer)
    record = {**dataclasses.asdict(cfg), "command_optimizer": optimizer}
    if study is not None:
        with run_folder("teacher", record, out, fresh, quiet) as run:
            _seed_study(cfg, run, *study, optimizer, quiet, out)
        return
    n_land = cfg.landscape_points + max(3, cfg.landscape_points // 3)
    total = cfg.num_steps + n_land + (2 * cfg.compare_steps if optimizer == "both" else 0)
    bar = tqdm(total=total, disable=quiet, file=sys.stderr, desc="teacher", unit="step")
    offset = [0]

    def progress(done, _total):
        bar.n = offset[0] + done
        bar.refresh()

    with run_folder("teacher", record, out, fresh, quiet) as run:
        collapse = run.cached(
            "collapse",
            lambda: T.run_student_teacher(cfg, progress=progress),
            f"collapse run: {cfg.optimizer} lr={cfg.lr} steps={cfg.num_steps}",
        )
        offset[0] = cfg.num_steps
        land = run.cached(
            "landscape",
            lambda: T.channel_landscape(cfg, collapse.theta_ref, progress=progress),
            "landscape along the unfolding direction",
        )
        offset[0] += n_land
        comp = None
        if optimizer == "both":
            comp = run.cached(
                "comparison",
                lambda: T.compare_optimizers(cfg, progress=progress),
                f"comparison: SGD vs LRNG at lr={cfg.compare_lr}, {cfg.compare_steps} steps",
            )
        bar.n = total
        bar.refresh()
        bar.close()
        summary = T.summarize(collapse, land, comp)
        run.write_json("summary.json", summary)
        figures = [("collapse", plot_collapse, collapse), ("landscape", plot_landscape, land)]
        if comp is not None:
            figures.append(("optimizers", plot_optimizers, comp))
        for name, fn, res in figures:
            axes = fn(res)
            fig = (axes[0] if hasattr(axes, "__len__") else axes).figure
            fig.tight_layout()
            run.save_figure(fig, name)
            plt.close(fig)
        run.log("done")
    if not quiet:
        click.echo(f"results in {Path(out)}")
        click.echo(json.dumps(summary, indent=1))
