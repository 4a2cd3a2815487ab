"""``lanczos-ntk teacher``: the student–teacher collapse experiment and the optimizer comparison.

Drives :mod:`lanczos_ntk.teacher`, saves its result objects in a run folder (atomically, through
:class:`lanczos_ntk.cli._runs.RunFolder`), draws the figures (PNG + PDF) and prints a summary. The
command is ``teacher_command``; the CLI group registers it with ``main.add_command``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from ._app import experiment_options, friendly, main, run_folder
from ._runs import ConfigError, load_config, merge_config, parse_list, parse_overrides

__all__ = ["plot_collapse", "plot_landscape", "plot_optimizers", "teacher_command"]


# --------------------------------------------------------------------------------- figures
def _crossing_line(ax, result, **kw):
    if result.crossing.step is not None:
        ax.axvline(result.crossing.step, color="0.4", ls="--", lw=1, **kw)


def plot_collapse(result, axes=None):
    """Loss, leading eigenvalue, effective ranks and top eigenvalues of ``G`` against the step.

    ``result`` is a :class:`~lanczos_ntk.teacher.StudentTeacherResult`; returns the 4 axes.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(4, 1, figsize=(6.4, 8.4), sharex=True)
    steps = result.steps.numpy()
    a0, a1, a2, a3 = axes
    a0.semilogy(range(len(result.loss)), result.loss.numpy(), color="k")
    a0.set_ylabel("loss")
    a1.plot(steps, result.leading.numpy(), "o-", ms=3, color="C3", label=r"Re $\lambda_c$ (trivial point)")
    a1.axhline(0, color="0.7", lw=0.8)
    a1b = a1.twinx()
    a1b.step(steps, result.num_stable.numpy(), where="post", color="C0", alpha=0.6)
    a1b.set_ylabel("# stable fixed points", color="C0")
    a1b.set_ylim(0, max(3, int(result.num_stable.max()) + 1))
    a1.set_ylabel(r"Re $\lambda_c$", color="C3")
    a2.plot(steps, result.participation.numpy(), "o-", ms=3, label="participation ratio")
    a2.plot(steps, result.entropy.numpy(), "s-", ms=3, label="entropy rank")
    a2.axvline(result.collapse["min_step"], color="C0", ls=":", lw=1, label="participation minimum")
    if result.crossing.step is not None:  # the dashed line drawn on every panel below
        a2.plot([], [], color="0.4", ls="--", lw=1, label=r"crossing (Re $\lambda_c$ = 0)")
    a2.set_ylabel("effective rank of G")
    a2.legend(fontsize=8)
    ev = result.eigenvalues.numpy()
    for j in range(ev.shape[1]):
        label = (
            r"$\lambda_1(G)$"
            if j == 0
            else (rf"$\lambda_2 \ldots \lambda_{{{ev.shape[1]}}}$" if j == 1 else None)
        )
        a3.semilogy(steps, ev[:, j], color="0.6" if j else "k", lw=1.5 if j == 0 else 0.8, label=label)
    a3.semilogy(
        steps,
        result.channel_eigenvalue.numpy(),
        "--",
        color="C1",
        label=r"$\hat g^\top G \hat g$ (static channel)",
    )
    if result.sensitivity_eigenvalue is not None:
        a3.semilogy(
            steps,
            result.sensitivity_eigenvalue.numpy(),
            "-.",
            color="C2",
            label=r"$\hat d^\top G \hat d$ (unfolding direction, what training uses)",
        )
    a3.set_ylabel("top eigenvalues of G")
    a3.set_xlabel("training step")
    lo, hi = a3.get_ylim()  # headroom above the curves (log axis), so the legend hides none
    a3.set_ylim(lo, hi * (hi / lo) ** 0.9)
    a3.legend(fontsize=7, loc="upper left", ncol=2)
    c = result.crossing
    cos = float(result.channel_cos[c.index]) if c.index is not None else float("nan")
    for ax in axes:
        _crossing_line(ax, result)
    title = f"{result.optimizer.upper()}, lr={result.lr:g}"
    if c.step is not None:
        title += (
            f": crossing at step {c.step:.1f}, PR min at {result.collapse['min_step']}, "
            f"|cos(u1, g)|={cos:.3f}"
        )
    a0.set_title(title, fontsize=9)
    return axes


def plot_landscape(land, axes=None):
    """``ĝᵀ G ĝ`` along the unfolding line: against ``s`` and, log-log, against ``|s - s_c|``."""
    import matplotlib.pyplot as plt
    import numpy as np

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 4))
    s, lb, pred = land.s.numpy(), land.lambda_bif.numpy(), land.predicted.numpy()
    order = np.argsort(s)
    a0, a1 = axes
    a0.semilogy(s[order], lb[order], "o-", label=r"$\lambda_{bif}=\hat g^\top G \hat g$")
    a0.semilogy(s[order], land.lambda_max.numpy()[order], "x", color="k", ms=4, label=r"$\lambda_{max}(G)$")
    a0.semilogy(s[order], pred[order], "--", color="C1", label="normal form, finite T")
    a0.axvline(land.s_c, color="0.4", ls="--", lw=1, label=r"$s_c$ (bifurcation)")
    a0.set_xlabel(r"offset $s$ along $\hat d = d\lambda_c/d\theta$")
    a0.set_ylabel("eigenvalue")
    a0.legend(fontsize=8)
    stable = land.mu.numpy() < 0
    d = np.abs(s - land.s_c)
    m = land.fit_mask.numpy()
    a1.loglog(d[stable], lb[stable], "o", mfc="none", color="C0", label="stable side")
    a1.loglog(d[m], lb[m], "o", color="C0", label="fit window")
    a1.loglog(d[stable], pred[stable], "--", color="C1", label="finite-T prediction")
    if np.isfinite(land.exponent):
        x = np.geomspace(d[m].min(), d[m].max(), 20)
        c = np.exp(np.mean(np.log(lb[m]) - land.exponent * np.log(d[m])))
        a1.loglog(
            x,
            c * x**land.exponent,
            "k-",
            lw=0.8,
            label=f"fit: exponent {land.exponent:.2f} ± {land.exponent_se:.2f}",
        )
        a1.loglog(x, c * x**-2.0 * (x[0] ** (land.exponent + 2)), ":", color="0.5", label="slope -2")
    if land.lambda_d is not None:
        ld, nf = land.lambda_d.numpy(), land.normal_form.numpy()
        a0.semilogy(s[order], ld[order], "s-", ms=3, color="C2", label=r"$\|J\hat d\|^2$ (along $d$)")
        a1.loglog(
            d[stable],
            ld[stable],
            "s",
            ms=3,
            color="C2",
            label=f"along d (fitted exponent {land.exponent_d:.2f})",
        )
        a1.loglog(
            d[stable],
            nf[stable],
            ":",
            color="C2",
            label=f"scalar normal form: exponent {land.normal_form_exponent:.2f}",
        )
        a0.legend(fontsize=7)
    a1.set_xlabel(r"$|s - s_c|$")
    a1.set_ylabel("eigenvalue")
    a1.legend(fontsize=7)
    a1.set_title(f"trials of {land.trial_steps} steps", fontsize=9)
    return axes


def plot_optimizers(comp, axes=None):
    """Loss and leading eigenvalue of SGD and LRNG at the same learning rate."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(2, 1, figsize=(6.4, 5.6), sharex=True)
    a0, a1 = axes
    for name, color in (("sgd", "C3"), ("lrng", "C0")):
        r = getattr(comp, name)
        a0.semilogy(
            range(len(r.loss)),
            r.loss.numpy(),
            color=color,
            label=f"{name.upper()}: final {r.final_loss:.2e}, {r.spikes} spikes, "
            f"{comp.seconds_per_step[name] * 1e3:.1f} ms/step",
        )
        a1.plot(r.steps.numpy(), r.leading.numpy(), color=color, label=name.upper())
    a0.set_ylabel("loss")
    a0.set_title(f"lr = {comp.lr:g}; LRNG overhead {comp.overhead:.2f}x per step", fontsize=9)
    lo, hi = a0.get_ylim()  # headroom above the curves (log axis), so the legend hides none
    a0.set_ylim(lo, hi * (hi / lo) ** 0.6)
    a0.legend(fontsize=8, loc="upper center")
    a1.axhline(0, color="0.7", lw=0.8)
    a1.set_ylabel(r"Re $\lambda_c$ (trivial point)")
    a1.set_xlabel("training step")
    a1.legend(fontsize=8)
    return axes


# --------------------------------------------------------------------------------- command
def _config(config_file, overrides, seed, steps, lr, optimizer):
    from ..teacher import TeacherConfig

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
    from .. import teacher as T

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

    from .. import teacher as T

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

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tqdm import tqdm

    from .. import teacher as T

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
