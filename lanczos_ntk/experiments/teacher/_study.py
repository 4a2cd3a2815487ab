"""Whole experiments: optimizer comparison, summaries, seed and architecture studies, tracked runs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..._results import Result
from ...track import train_tracked
from ._landscape import channel_landscape
from ._problem import _generator, build_problem
from ._results import (
    ARCHITECTURES,
    ChannelLandscape,
    OptimizerComparison,
    Progress,
    StudentTeacherResult,
    TeacherConfig,
    TeacherExperiment,
)
from ._training import run_student_teacher


# ---------------------------------------------------------------------------- comparison
def compare_optimizers(
    config: TeacherConfig | None = None, *, generator_seed: int | None = None, progress: Progress = None
) -> OptimizerComparison:
    """Train SGD and LRNG from the same student at ``config.compare_lr`` for ``compare_steps``.

    Each run draws the problem from a fresh generator seeded with ``generator_seed`` (default
    ``config.seed``), so both start from identical parameters. ``progress`` counts the steps of
    both runs together.
    """
    config = config or TeacherConfig()
    seed = int(config.seed if generator_seed is None else generator_seed)
    total = 2 * int(config.compare_steps)
    runs = {}
    for j, name in enumerate(("sgd", "lrng")):
        cfg = dataclasses.replace(
            config,
            optimizer=name,
            lr=config.compare_lr,
            num_steps=config.compare_steps,
            record_every=config.compare_record_every,
        )
        gen = torch.Generator()
        gen.manual_seed(seed)
        offset = j * int(config.compare_steps)
        cb = None if progress is None else (lambda d, _t, o=offset: progress(o + d, total))
        runs[name] = run_student_teacher(cfg, generator=gen, progress=cb)
    per = {k: r.seconds_train / max(1, r.config.num_steps) for k, r in runs.items()}
    return OptimizerComparison(
        sgd=runs["sgd"],
        lrng=runs["lrng"],
        lr=float(config.compare_lr),
        seconds_per_step=per,
        overhead=per["lrng"] / per["sgd"],
    )


def run_experiment(
    config: TeacherConfig | None = None,
    *,
    progress: Progress = None,
    which: tuple[str, ...] = ("collapse", "landscape", "comparison"),
) -> TeacherExperiment:
    """The collapse run (``config.optimizer`` at ``config.lr``), the landscape through its
    crossing, and the optimizer comparison, with a summary of the numbers.

    ``progress(done, total)`` counts training steps and landscape points together.
    """
    config = config or TeacherConfig()
    n_land = int(config.landscape_points) + max(3, int(config.landscape_points) // 3)
    total = int(config.num_steps) + n_land + 2 * int(config.compare_steps)
    done = [0]

    def sub(offset):
        if progress is None:
            return None
        return lambda d, _t: progress(offset + d, total)

    gen = torch.Generator()
    gen.manual_seed(int(config.seed))
    collapse = run_student_teacher(config, generator=gen, progress=sub(0))
    done[0] = int(config.num_steps)
    gen = torch.Generator()
    gen.manual_seed(int(config.seed))
    landscape = channel_landscape(config, collapse.theta_ref, generator=gen, progress=sub(done[0]))
    done[0] += n_land
    comparison = compare_optimizers(config, progress=sub(done[0]))
    return TeacherExperiment(
        config=config,
        collapse=collapse,
        landscape=landscape,
        comparison=comparison,
        summary=summarize(collapse, landscape, comparison),
    )


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _direction_summary(r: StudentTeacherResult) -> dict:
    """Which direction training uses (d or g) before the crossing, and the (W, B) block."""
    if r.sensitivity_eigenvalue is None:
        return {}
    # the optional diagnostics are recorded together (run_student_teacher sets them all)
    assert r.block_sensitivity_cos is not None and r.block_participation is not None
    assert r.update_bias_share is not None
    c = r.crossing
    last = (c.index - 1) if c.index is not None else len(r.steps) - 1
    upto = slice(0, max(last, 0) + 1)

    def med(t):
        t = t[upto]
        t = t[torch.isfinite(t)]
        return float(t.median()) if t.numel() else None

    return {
        "sensitivity_eigenvalue_initial": _finite(r.sensitivity_eigenvalue[0]),
        "sensitivity_eigenvalue_before_crossing": _finite(r.sensitivity_eigenvalue[last]),
        "channel_eigenvalue_before_crossing": _finite(r.channel_eigenvalue[last]),
        "gradient_channel_cos_median": med(r.gradient_channel_cos),
        "gradient_sensitivity_cos_median": med(r.gradient_sensitivity_cos),
        "block_sensitivity_cos_before_crossing": _finite(r.block_sensitivity_cos[last]),
        "block_participation_initial": _finite(r.block_participation[0]),
        "block_participation_before_crossing": _finite(r.block_participation[last]),
        "bias_share_median": (float(r.update_bias_share.median()) if r.update_bias_share.numel() else None),
    }


def spike_bias_share(r: StudentTeacherResult) -> float | None:
    """Median over spike onsets of the largest bias share (``‖Δb‖/‖Δθ‖``) of the three updates
    before each: near 1 when the spikes are the biases (None without spikes).
    """
    if r.update_bias_share is None or not r.spike_onsets:
        return None
    shares = r.update_bias_share
    vals = [float(shares[max(0, t - 3) : t].max()) for t in r.spike_onsets if t > 0]
    return float(torch.tensor(vals).median()) if vals else None


def summarize(
    collapse: StudentTeacherResult,
    landscape: ChannelLandscape | None = None,
    comparison: OptimizerComparison | None = None,
) -> dict:
    """The headline numbers as a flat dictionary of floats and ints."""
    c = collapse.crossing
    out = {
        "crossing_step": c.step,
        "stable_change_step": c.stable_change_step,
        "pr_initial": collapse.collapse["initial"],
        "pr_min": collapse.collapse["min_value"],
        "pr_min_step": collapse.collapse["min_step"],
        "pr_steepest_step": collapse.collapse["steepest_step"],
        "pr_half_step": collapse.collapse["half_step"],
        "entropy_initial": float(collapse.entropy[0]),
        "entropy_min": float(collapse.entropy.min()),
        "channel_cos_at_crossing": (float(collapse.channel_cos[c.index]) if c.index is not None else None),
        "sensitivity_cos_at_crossing": (
            float(collapse.sensitivity_cos[c.index]) if c.index is not None else None
        ),
        "collapse_final_loss": collapse.final_loss,
    }
    out.update(_direction_summary(collapse))
    if landscape is not None:
        out.update(
            {
                "landscape_exponent": landscape.exponent,
                "landscape_exponent_se": landscape.exponent_se,
                "landscape_predicted_exponent": landscape.predicted_exponent,
                "landscape_ratio_to_prediction": landscape.ratio,
                "landscape_exponent_d": landscape.exponent_d,
                "landscape_normal_form_exponent": landscape.normal_form_exponent,
                "landscape_ratio_d_to_normal_form": landscape.ratio_d,
            }
        )
    if comparison is not None:
        for name in ("sgd", "lrng"):
            r = getattr(comparison, name)
            out.update(
                {
                    f"{name}_final_loss": r.final_loss,
                    f"{name}_max_loss_after_crossing": r.max_loss_after_crossing,
                    f"{name}_max_loss_after_fit": r.max_loss_after_fit,
                    f"{name}_spikes": r.spikes,
                    f"{name}_spike_bias_share": spike_bias_share(r),
                    f"{name}_crossing_step": r.crossing.step,
                    f"{name}_recrossings": r.crossing.recrossings,
                    f"{name}_seconds_per_step": comparison.seconds_per_step[name],
                }
            )
        out["lrng_overhead"] = comparison.overhead
    return out


# ------------------------------------------------------------------------ seeds and models
@dataclasses.dataclass(frozen=True)
class SeedStudy(Result):
    """The experiment over several seeds and architectures (:func:`run_seeds`).

    ``rows``: one :func:`summarize` dictionary per run, with ``architecture`` and ``seed``
    (``error`` instead when a seed's problem could not be drawn). :meth:`spread` condenses them.
    """

    config: TeacherConfig
    rows: list

    def spread(self, keys: tuple[str, ...] | None = None) -> dict:
        """``{architecture: {key: {"mean", "std", "min", "max", "n"}}}`` over the seeds (numbers
        only; ``None`` entries, e.g. no crossing, are left out and ``n`` says how many counted).
        """
        out: dict = {}
        for row in self.rows:
            if "error" in row:
                continue
            arch = out.setdefault(row["architecture"], {})
            for k, v in row.items():
                if k in ("architecture", "seed") or (keys is not None and k not in keys):
                    continue
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    arch.setdefault(k, []).append(float(v))
        for table in out.values():
            for k, vals in table.items():
                t = torch.tensor(vals, dtype=torch.float64)
                table[k] = {
                    "mean": float(t.mean()),
                    "std": float(t.std()) if t.numel() > 1 else 0.0,
                    "min": float(t.min()),
                    "max": float(t.max()),
                    "n": int(t.numel()),
                }
        return out


def run_seeds(
    config: TeacherConfig | None = None,
    *,
    seeds=(0, 1, 2, 3, 4),
    architectures=ARCHITECTURES,
    landscape: bool = True,
    compare: bool = True,
    progress: Progress = None,
    run=None,
) -> SeedStudy:
    """:func:`run_student_teacher` (and optionally the landscape and the optimizer comparison)
    for every architecture and seed, summarised per run.

    ``run(config, landscape, compare) -> dict`` replaces the default runner (for caching
    by the command line); ``progress(done, total)`` counts runs.
    """
    config = config or TeacherConfig()
    bad = [a for a in architectures if a not in ARCHITECTURES]
    if bad:
        raise ValueError(f"expected architectures from {ARCHITECTURES}, got {bad}")
    run = run or run_summary
    rows = []
    total = len(architectures) * len(seeds)
    for j, (arch, seed) in enumerate((a, s) for a in architectures for s in seeds):
        cfg = dataclasses.replace(config, architecture=arch, seed=int(seed))
        try:
            row = run(cfg, landscape, compare)
        except ValueError as exc:  # e.g. W0 without a positive real eigenvalue for this seed
            row = {"error": str(exc)}
        rows.append({"architecture": arch, "seed": int(seed), **row})
        if progress is not None:
            progress(j + 1, total)
    return SeedStudy(config=config, rows=rows)


@dataclasses.dataclass(frozen=True)
class StudyRow(Result):
    """One run of a :class:`SeedStudy` (a unit the command line saves and resumes)."""

    architecture: str
    seed: int
    summary: dict


def run_summary(cfg: TeacherConfig, landscape: bool = True, compare: bool = True) -> dict:
    """One run of the experiment (the collapse run, optionally the landscape through its
    crossing and the optimizer comparison) condensed by :func:`summarize`.
    """
    gen = torch.Generator()
    gen.manual_seed(int(cfg.seed))
    collapse = run_student_teacher(cfg, generator=gen)
    land = channel_landscape(cfg, collapse.theta_ref) if landscape else None
    comp = compare_optimizers(cfg) if compare else None
    return summarize(collapse, land, comp)


# ----------------------------------------------------------------------------- early warning
@dataclasses.dataclass(frozen=True)
class TrackedRun(Result):
    """The student trained by SGD with the kernel tracker on (:func:`run_tracked`).

    ``track``: the :class:`lanczos_ntk.track.TrainingTrack` (records, loss, the actual crossing,
    the first warning, lead time, estimate at the warning, overhead); ``control``: the teacher
    needs no bifurcation (its gain below the critical one), so any warning is a false alarm;
    ``lead_fraction``: the lead time over the run's steps.
    """

    track: Any
    architecture: str
    seed: int
    control: bool
    lead_fraction: float | None


def run_tracked(
    config: TeacherConfig | None = None,
    *,
    horizon: float = 10.0,
    every: int = 2,
    control: bool = False,
    control_gain: float = 0.8,
    progress: Progress = None,
) -> TrackedRun:
    """Train the student with SGD (``config.lr``, ``config.num_steps``) while a
    :class:`~lanczos_ntk.track.KernelTracker` watches the trivial fixed point at zero input.

    ``control=True`` replaces the teacher's gain by ``control_gain`` (below the critical gain
    1): the student can fit it without a bifurcation, and every warning is a false alarm.
    """
    config = config or TeacherConfig()
    if control:
        config = dataclasses.replace(config, teacher_gain=float(control_gain))
    gen = _generator(config, None)
    prob = build_problem(config, gen)
    run = train_tracked(
        prob.student,
        prob.inputs,
        prob.targets,
        lr=config.lr,
        num_steps=config.num_steps,
        every=every,
        horizon=horizon,
        generator=gen,
        progress=progress,
        k=min(int(config.top_k), 8),
    )
    lead = run.lead_time
    return TrackedRun(
        track=run,
        architecture=config.architecture,
        seed=int(config.seed),
        control=control,
        lead_fraction=None if lead is None else lead / run.num_steps,
    )
