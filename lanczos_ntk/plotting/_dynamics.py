"""Sweeps and bifurcation diagrams, and the sweep / bifurcate figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._common import BIFURCATION_STYLE, _axes, _critical_line, _get, _np, _param_label, _pyplot, fmt_param
from ._spectra import plot_eigenvalues, plot_spectral_density

__all__ = ["plot_sweep", "plot_bifurcation_diagram", "sweep_figures", "bifurcate_figure"]


_SWEEP_QUANTITIES = {
    "eigenvalues": ("top eigenvalues of K", True),
    "effective_rank": ("effective rank", False),
    "trace": ("trace of K", True),
    "condition": ("condition number (nonzero part)", True),
    "stability": ("leading eigenvalue of the fixed point", False),
}


def _mark_bifurcations(ax, bifurcations: Sequence, *, labelled: set | None = None) -> None:
    """Vertical lines at bifurcation parameters, one legend entry per kind."""
    labelled = set() if labelled is None else labelled
    for b in bifurcations:
        kind = _get(b, "kind", default="stability_change")
        p = float(_get(b, "p", "value"))
        marker, color, name = BIFURCATION_STYLE.get(kind, BIFURCATION_STYLE["stability_change"])
        style = ":" if kind == "stability_change" else "--"
        ax.axvline(p, color=color, ls=style, lw=1.2, label=None if kind in labelled else name)
        labelled.add(kind)


def plot_sweep(
    sweep: Any,
    ax=None,
    quantity: str = "eigenvalues",
    *,
    bifurcations: Sequence | None = None,
    param: str | None = None,
    log: bool | None = None,
):
    r"""Draw one spectral or dynamical quantity against the swept parameter.

    Parameters
    ----------
    sweep : sweep result or mapping
        With ``values [N]`` (the parameter) and the arrays the quantity needs:
        ``eigenvalues [N, k]`` (descending); ``participation [N]`` and ``entropy [N]``
        (effective ranks); ``trace [N]``; ``condition [N]``; ``leading [N]`` (largest real part
        of the eigenvalues at the fixed point for a flow, largest modulus minus one for a map).
        Optional ``bifurcations`` (items with ``p`` and ``kind``) and ``param`` (axis label).
    quantity : {"eigenvalues", "effective_rank", "trace", "condition", "stability"}
    bifurcations : sequence, optional
        Overrides the sweep's; each drawn as a vertical line, one legend entry per kind.
    log : bool, optional
        Logarithmic y axis (default for eigenvalues, trace and condition number).

    Returns
    -------
    Axes
    """
    if quantity not in _SWEEP_QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; expected one of {', '.join(_SWEEP_QUANTITIES)}")
    ax = _axes(ax)
    x = _np(_get(sweep, "values"))
    ylabel, default_log = _SWEEP_QUANTITIES[quantity]
    if quantity == "eigenvalues":
        eig = _np(_get(sweep, "eigenvalues"))
        eig = eig.reshape(len(x), -1)
        for j in range(eig.shape[1]):
            ax.plot(
                x,
                eig[:, j],
                marker="o",
                ms=3,
                lw=1.4 if j == 0 else 0.9,
                color="tab:blue",
                alpha=1.0 if j == 0 else max(0.25, 0.8 - 0.12 * j),
                label="λ₁ (largest)" if j == 0 else ("λ₂…λ_k" if j == 1 else None),
            )
    elif quantity == "effective_rank":
        for key, name, color in (
            ("participation", "participation (tr K)²/tr K²", "tab:green"),
            ("entropy", "entropy exp(−Σ p log p)", "tab:olive"),
        ):
            y = _get(sweep, key)
            if y is not None:
                y = _np(y)
                ax.plot(x, y, marker="o", ms=3, color=color, label=name)
                err = _get(sweep, key + "_se")
                if err is not None:
                    err = _np(err)
                    ax.fill_between(x, y - 2 * err, y + 2 * err, color=color, alpha=0.15)
    elif quantity == "stability":
        y = _np(_get(sweep, "leading"))
        ax.plot(x, y, marker="o", ms=3, color="tab:red", label="leading eigenvalue")
        ax.axhline(0.0, color="black", lw=0.8)
    else:
        y = _np(_get(sweep, quantity))
        ax.plot(x, y, marker="o", ms=3, color="tab:blue", label=ylabel)
    if log if log is not None else default_log:
        ax.set_yscale("log")
    labels = _get(sweep, "labels")
    if _get(sweep, "param") == "checkpoints" and labels is not None and len(labels) == len(x):
        ax.set_xticks(x, [str(v) for v in labels], rotation=30, ha="right", fontsize=7)
    bifs = bifurcations if bifurcations is not None else (_get(sweep, "bifurcations") or [])
    _mark_bifurcations(ax, bifs)
    ax.set_xlabel(param or str(_get(sweep, "param", default="parameter")))
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return ax


def _coordinate(points: np.ndarray, coordinate) -> tuple[np.ndarray, str]:
    if points.ndim == 1:
        points = points[:, None]
    if coordinate is None:
        coordinate = 0 if points.shape[1] == 1 else "norm"
    if coordinate == "norm":
        return np.linalg.norm(points, axis=1), "‖x*‖ (state norm)"
    if coordinate == "mean":
        return points.mean(axis=1), "mean of x*"
    i = int(coordinate)
    return points[:, i], f"x*[{i}]" if points.shape[1] > 1 else "x*"


def plot_bifurcation_diagram(
    branch: Any,
    ax=None,
    *,
    coordinate: int | str | None = None,
    param: str | None = None,
    color=None,
    label_points: bool = True,
):
    r"""Draw fixed-point branches against the continuation parameter.

    Stable stretches are solid, unstable dashed; the branch's bifurcations are marked and
    labelled by kind (fold, branch point, Hopf, flip, Neimark–Sacker).

    Parameters
    ----------
    branch : Branch or sequence of Branch
        From :func:`lanczos_ntk.dynamics.continuation` (``points [N, n]``, ``p [N]``,
        ``stable [N]``, ``bifurcations``).
    coordinate : int, "norm" or "mean", optional
        What is drawn on the y axis: a state component, the norm ``‖x*‖`` or the mean of the
        components (default: the state for ``n = 1``, the norm otherwise).
    param : str, optional
        Label of the x axis (default "parameter p").

    Returns
    -------
    Axes
    """
    ax = _axes(ax)
    branches = list(branch) if isinstance(branch, (list, tuple)) else [branch]
    seen: set = set()
    annotated: dict = {}
    ylabel = "x*"
    for br in branches:
        p = _np(_get(br, "p")).reshape(-1)
        if p.size == 0:
            continue
        y, ylabel = _coordinate(_np(_get(br, "points")), coordinate)
        stable = _np(_get(br, "stable")).astype(bool).reshape(-1)
        bifs = _get(br, "bifurcations", default=[]) or []
        # split into runs of equal stability, broken at the bifurcation between two points
        # (or half-way when none was located there)
        xs, ys = [p[0]], [y[0]]
        for i in range(1, len(p)):
            if stable[i] != stable[i - 1]:
                bp, by = 0.5 * (p[i - 1] + p[i]), 0.5 * (y[i - 1] + y[i])
                for b in bifs:
                    q = float(_get(b, "p"))
                    if min(p[i - 1], p[i]) <= q <= max(p[i - 1], p[i]):
                        bp = q
                        by = _coordinate(_np(_get(b, "x")).reshape(1, -1), coordinate)[0][0]
                        break
                xs.append(None)
                ys.append((bp, by))
            xs.append(p[i])
            ys.append(y[i])
        runs, cur_x, cur_y, cur_s = [], [], [], bool(stable[0])
        for xv, yv in zip(xs, ys):
            if xv is None:  # a break: end this run at the break point, start the next there
                cur_x.append(yv[0])
                cur_y.append(yv[1])
                runs.append((cur_x, cur_y, cur_s))
                cur_x, cur_y, cur_s = [yv[0]], [yv[1]], not cur_s
                continue
            cur_x.append(xv)
            cur_y.append(yv)
        runs.append((cur_x, cur_y, cur_s))
        c = color or "black"
        for rx, ry, st in runs:
            name = "stable" if st else "unstable"
            ax.plot(
                rx,
                ry,
                color=c,
                ls="-" if st else "--",
                lw=1.6 if st else 1.2,
                label=None if name in seen else name,
            )
            seen.add(name)
        for b in bifs:
            kind = _get(b, "kind")
            marker, mcolor, name = BIFURCATION_STYLE.get(kind, BIFURCATION_STYLE["stability_change"])
            by, _ = _coordinate(_np(_get(b, "x")).reshape(1, -1), coordinate)
            bp = float(_get(b, "p"))
            ax.plot(
                [bp],
                [by[0]],
                marker=marker,
                color=mcolor,
                ms=9,
                ls="none",
                markeredgecolor="black",
                zorder=5,
                label=None if kind in seen else name,
            )
            seen.add(kind)
            key = (round(bp, 3), round(float(by[0]), 3))
            names = annotated.setdefault(key, [mcolor])
            if f"{name} p={fmt_param(bp)}" not in names:
                names.append(f"{name} p={fmt_param(bp)}")
    if label_points:
        for (bp, by), (mcolor, *texts) in annotated.items():
            ax.annotate(
                "\n".join(texts),
                (bp, by),
                textcoords="offset points",
                xytext=(6, 8),
                fontsize=7,
                color=mcolor,
            )
    ax.set_xlabel(param or "parameter p")
    ax.set_ylabel(ylabel)
    if seen:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return ax


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
    plt = _pyplot()
    label = _param_label(sweep.param)
    figs = {}

    def eig(ax):
        plot_sweep(sweep, ax, "eigenvalues", param=label)
        _critical_line(ax, sweep.critical_value)
        ax.legend(fontsize=7)
        ax.set_title("top eigenvalues of the sNTK K = J Jᵀ", fontsize=9)

    def rank(ax):
        plot_sweep(sweep, ax, "effective_rank", param=label)
        _critical_line(ax, sweep.critical_value)
        ax.legend(fontsize=7)
        ax.set_title("effective rank (± 2 s.e.)", fontsize=9)

    def dens(ax):
        cmap = plt.get_cmap("viridis")
        for j, (name, d) in enumerate(densities):
            plot_spectral_density(
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
            plot_bifurcation_diagram(sweep.branch, ax, param=label)
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
        plot_sweep(sweep, ax, "stability", param=label)
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


def bifurcate_figure(branches, bifs, kind: str, param: str):
    """The bifurcation diagram and the eigenvalues at each located bifurcation ``bifs``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), gridspec_kw={"width_ratios": [1.6, 1]})
    plot_bifurcation_diagram(branches, axes[0], param=param)
    axes[0].set_title(f"{len(branches)} branch(es) of fixed points", fontsize=9)
    if bifs:
        for b in bifs[:4]:
            name = BIFURCATION_STYLE[b.kind][2]
            plot_eigenvalues(b.eigenvalues, axes[1], kind=kind, label=f"{name} at p={fmt_param(b.p)}")
        axes[1].set_title("eigenvalues at the bifurcations", fontsize=9)
    else:
        axes[1].text(
            0.5, 0.5, "no bifurcation detected", ha="center", va="center", transform=axes[1].transAxes
        )
        axes[1].set_axis_off()
    fig.tight_layout()
    return fig
