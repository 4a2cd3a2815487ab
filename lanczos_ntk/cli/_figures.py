"""Figures of the commands, composed from :mod:`lanczos_ntk.plotting` (Agg backend)."""

from __future__ import annotations

import math

import numpy as np

from .. import plotting

__all__ = ["bifurcate_figure", "density_figure", "spectrum_figure", "sweep_figures"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _param_label(param: str) -> str:
    return {"gain": "recurrent gain g", "input": "input level (× inputs)", "checkpoints": "checkpoint"}.get(
        param, f"parameter {param}"
    )


def _critical_line(ax, value: float) -> None:
    if math.isfinite(value):
        ax.axvline(value, color="black", ls=(0, (1, 3)), lw=1.0, label="predicted critical gain")


def _fixed_point_scatter(ax, points) -> None:
    """Norms of all fixed points found at each sweep point: stable filled, unstable open."""
    shown = set()
    for p in points:
        fp = p.fixed_points
        if fp is None or len(fp) == 0:
            continue
        norms = fp.points.norm(dim=1).numpy()
        stable = fp.stable.numpy().astype(bool)
        for mask, style, name in (
            (stable, {"color": "tab:blue"}, "fixed points (stable)"),
            (~stable, {"facecolors": "none", "edgecolors": "tab:red"}, "fixed points (unstable)"),
        ):
            if mask.any():
                ax.scatter(
                    np.full(mask.sum(), p.value),
                    norms[mask],
                    s=22,
                    zorder=4,
                    label=None if name in shown else name,
                    **style,
                )
                shown.add(name)


def sweep_figures(sweep, points, densities, *, title: str = "") -> dict:
    """The sweep's figures: an overview (2 × 2) and one figure per panel.

    ``densities`` is a list of ``(label, SpectralDensity)``; returns ``{name: Figure}``.
    """
    plt = _plt()
    label = _param_label(sweep.param)
    figs = {}

    def eig(ax):
        plotting.plot_sweep(sweep, ax, "eigenvalues", param=label)
        _critical_line(ax, sweep.critical_value)
        ax.legend(fontsize=7)
        ax.set_title("top eigenvalues of the sNTK K = J Jᵀ", fontsize=9)

    def rank(ax):
        plotting.plot_sweep(sweep, ax, "effective_rank", param=label)
        _critical_line(ax, sweep.critical_value)
        ax.legend(fontsize=7)
        ax.set_title("effective rank (± 2 s.e.)", fontsize=9)

    def dens(ax):
        cmap = plt.get_cmap("viridis")
        for j, (name, d) in enumerate(densities):
            plotting.plot_spectral_density(
                d, ax, log=True, label=name, color=cmap(j / max(len(densities) - 1, 1)), annotate=False
            )
        if densities:
            z = densities[0][1].zero_mass
            ax.set_title(f"spectral density (top exact + SLQ); zero mass {z:.3g}", fontsize=9)

    has_dynamics = sweep.branch is not None or any(p.fixed_points is not None for p in points)

    def bif(ax):
        if not has_dynamics:
            ax.text(
                0.5,
                0.5,
                "no fixed-point analysis\n(the model has no rhs(h, u), or it was switched off)",
                ha="center",
                va="center",
                transform=ax.transAxes,
                fontsize=9,
            )
            ax.set_axis_off()
            return
        if sweep.branch is not None and len(sweep.branch):
            plotting.plot_bifurcation_diagram(sweep.branch, ax, param=label)
        _fixed_point_scatter(ax, points)
        for b in sweep.bifurcations:
            if b["kind"] == "stability_change":
                ax.axvline(b["p"], color="tab:gray", ls=":", lw=1.2)
        _critical_line(ax, sweep.critical_value)
        if sweep.param == "checkpoints":
            ax.set_xticks(sweep.values.numpy(), sweep.labels, rotation=30, ha="right", fontsize=7)
        lo, hi = ax.get_ylim()
        if hi - lo < 1e-3:  # only the trivial point: do not zoom onto round-off
            ax.set_ylim(-0.1, 1.0)
        ax.set_xlabel(label)
        ax.set_ylabel("‖x*‖ (state norm)")
        ax.legend(fontsize=7, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_title("fixed points and continued branch", fontsize=9)

    kinds = {p.fixed_points.kind for p in points if getattr(p, "fixed_points", None) is not None}

    def stab(ax):
        plotting.plot_sweep(sweep, ax, "stability", param=label)
        ax.set_ylabel(
            {"flow": "max Re λ  (> 0: unstable)", "map": "max |μ| − 1  (> 0: unstable)"}.get(
                kinds.pop() if len(kinds) == 1 else "", "max Re λ (flow) / max |μ| − 1 (map)"
            )
        )
        ax.set_title("stability of the fixed point nearest 0", fontsize=9)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for draw, ax in zip((eig, rank, dens, bif), axes.ravel()):
        draw(ax)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    figs["overview"] = fig
    panels = [("eigenvalues", eig), ("effective_rank", rank), ("densities", dens)]
    if has_dynamics:
        panels += [("bifurcation", bif), ("stability", stab)]
    for name, draw in panels:
        f, ax = plt.subplots(figsize=(6, 4.2))
        draw(ax)
        f.tight_layout()
        figs[name] = f
    return figs


def spectrum_figure(summary, density):
    """Extreme eigenvalues (with residual bounds) and the spectral density on log axes."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    top = summary.top.eigenvalues.numpy()
    a.errorbar(
        np.arange(1, len(top) + 1),
        top,
        yerr=summary.top.residuals.numpy(),
        fmt="o",
        color="tab:blue",
        label="top eigenvalues (residual bounds)",
    )
    if summary.bottom is not None and len(summary.bottom.eigenvalues):
        # the smallest nonzero eigenvalues sit at the end of the ordering: i = r - j for the
        # j-th smallest of the r nonzero ones (r = M - the null dimension, counted on K's side)
        bot = np.sort(summary.bottom.eigenvalues.numpy())[::-1]
        r = max(int(summary.bottom.primal_dimension) - int(summary.bottom.null_dim or 0), len(bot) + len(top))
        a.plot(
            np.arange(r - len(bot) + 1, r + 1),
            bot,
            "s",
            color="tab:red",
            label=f"smallest eigenvalues above rounding (of r = {r})",
        )
        a.set_xscale("log")
    # two notions of zero, both drawn: eigsh's null space is rounding (1000 eps λ_max); the
    # density (right) also counts as zero mass everything below its resolution cut
    a.axhline(
        density.zero_threshold,
        color="0.4",
        ls="--",
        lw=0.8,
        label=f"density's zero cut ({density.zero_mass:.3g} of the mass below)",
    )
    a.set_yscale("log")
    a.set_xlabel("index i of λ_i (1 = largest)")
    a.set_ylabel("eigenvalue λ_i of K")
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    a.set_title(
        f"participation rank {summary.participation.value:.3g}, entropy rank {summary.entropy.value:.3g}",
        fontsize=9,
    )
    plotting.plot_spectral_density(density, b, log=True)
    b.set_title("spectral density (top exact + SLQ)", fontsize=9)
    fig.tight_layout()
    return fig


def density_figure(density_lin, density_log):
    """The density on linear and on logarithmic axes, zero mass annotated."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    plotting.plot_spectral_density(density_lin, a, log=False)
    a.set_title("linear scale", fontsize=9)
    plotting.plot_spectral_density(density_log, b, log=True)
    b.set_title("log scale (smoothed in log10 λ)", fontsize=9)
    fig.tight_layout()
    return fig


def bifurcate_figure(branches, bifs, kind: str, param: str):
    """The bifurcation diagram and the eigenvalues at each located bifurcation ``bifs``."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    plotting.plot_bifurcation_diagram(branches, axes[0], param=param)
    axes[0].set_title(f"{len(branches)} branch(es) of fixed points", fontsize=9)
    if bifs:
        for b in bifs[:4]:
            name = plotting.BIFURCATION_STYLE[b.kind][2]
            plotting.plot_eigenvalues(
                b.eigenvalues, axes[1], kind=kind, label=f"{name} at p={plotting.fmt_param(b.p)}"
            )
        axes[1].set_title("eigenvalues at the bifurcations", fontsize=9)
    else:
        axes[1].text(
            0.5, 0.5, "no bifurcation detected", ha="center", va="center", transform=axes[1].transAxes
        )
        axes[1].set_axis_off()
    fig.tight_layout()
    return fig
