"""Training runs: the tracked kernel and the student–teacher experiment's figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import _np

__all__ = ["plot_track", "plot_collapse", "plot_landscape", "plot_optimizers"]


def plot_track(records: Any, axes=None, *, crossing: float | None = None, title: str = ""):
    """A :class:`lanczos_ntk.track.TrackRecords` time series on four axes.

    Top eigenvalues of ``G`` (log); participation rank; the leading eigenvalue ``λ_c`` with the
    estimated crossing step at each record and the warnings; the alignments of the top
    eigenvector and of the gradient with the critical directions. ``crossing`` (the actual
    crossing step, if known) is a dashed line on every panel. Returns the four axes.
    """
    if axes is None:
        import matplotlib.pyplot as plt

        _, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
        axes = axes.ravel()
    a, b, c, d = axes
    steps = _np(records.steps).astype(float)
    eig = _np(records.eigenvalues)
    for j in range(eig.shape[1] if eig.ndim == 2 else 0):
        a.plot(
            steps,
            eig[:, j],
            color="tab:blue",
            alpha=1.0 if j == 0 else 0.35,
            lw=1.6 if j == 0 else 0.9,
            label="λ_max(G)" if j == 0 else None,
        )
    a.set_yscale("log")
    a.set_ylabel("top eigenvalues of G")
    pr, se = _np(records.participation), _np(records.participation_se)
    b.errorbar(steps, pr, yerr=se, fmt="o-", ms=3, color="tab:green")
    b.set_ylabel("participation rank of G")
    lead = _np(records.leading)
    c.plot(steps, lead, "o-", ms=3, color="tab:red", label="λ_c (leading eigenvalue)")
    c.axhline(0.0, color="0.3", lw=0.8)
    c.set_ylabel("λ_c  (> 0: unstable)")
    est = _np(records.estimated_crossing)
    warned = _np(records.warned).astype(bool)
    tw = c.twinx()
    tw.plot(steps, est, "s", ms=3, color="tab:orange", label="estimated crossing step")
    if warned.any():
        tw.plot(
            steps[warned], est[warned], "s", ms=6, mfc="none", color="k", label="warning (within the horizon)"
        )
    tw.set_ylabel("estimated crossing step", color="tab:orange")
    lines = c.get_legend_handles_labels()
    more = tw.get_legend_handles_labels()
    c.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower right")
    for key, label, style in (
        ("channel_cos", "‖Q_gᵀ u₁‖ (top eigenvector, g)", "-"),
        ("sensitivity_cos", "|cos(u₁, d)|", "--"),
        ("gradient_channel_cos", "‖Q_gᵀ ∇L‖/‖∇L‖", ":"),
        ("gradient_sensitivity_cos", "|cos(∇L, d)|", "-."),
    ):
        d.plot(steps, _np(getattr(records, key)), style, label=label)
    d.set_ylim(-0.02, 1.02)
    d.set_ylabel("alignment with the critical directions")
    d.legend(fontsize=7)
    for ax in (a, b, c, d):
        if crossing is not None:
            ax.axvline(crossing, color="tab:red", ls="--", lw=0.9)
        ax.grid(alpha=0.3)
    for ax in (c, d):
        ax.set_xlabel("training step")
    if title:
        a.figure.suptitle(title, fontsize=10)
    return axes


def _crossing_line(ax, result, **kw):
    if result.crossing.step is not None:
        ax.axvline(result.crossing.step, color="0.4", ls="--", lw=1, **kw)


def plot_collapse(result, axes=None):
    """Loss, leading eigenvalue, effective ranks and top eigenvalues of ``G`` against the step.

    ``result`` is a :class:`~lanczos_ntk.experiments.teacher.StudentTeacherResult`; returns the 4 axes.
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
