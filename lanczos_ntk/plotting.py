"""Figures from result objects (matplotlib is imported lazily, inside the functions).

Every function takes a result (or plain arrays) and an optional :class:`matplotlib.axes.Axes`,
draws on it (a new figure when ``ax`` is None) and returns the axes. Nothing is shown or saved:
the caller decides (the CLI saves PNG and PDF with the Agg backend).

- :func:`plot_spectral_density`: an SLQ spectral density, linear or log scale, zero mass noted.
- :func:`plot_sweep`: top eigenvalues, effective rank, trace, ... against a swept parameter,
  with the detected bifurcations marked.
- :func:`plot_bifurcation_diagram`: fixed-point branches (stable solid, unstable dashed) with
  special points marked and labelled by kind.
- :func:`plot_eigenvalues`: eigenvalues in the complex plane with the stability boundary
  (imaginary axis for a flow, unit circle for a map).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BIFURCATION_STYLE",
    "fmt_param",
    "plot_bifurcation_diagram",
    "plot_eigenvalues",
    "plot_spectral_density",
    "plot_sweep",
    "plot_track",
]

#: Marker, colour and label of each bifurcation kind (shared by all figures).
BIFURCATION_STYLE = {
    "fold": ("v", "tab:red", "fold"),
    "branch_point": ("D", "tab:purple", "branch point"),
    "hopf": ("*", "tab:orange", "Hopf"),
    "flip": ("s", "tab:brown", "flip"),
    "neimark_sacker": ("P", "tab:pink", "Neimark–Sacker"),
    "stability_change": ("o", "tab:gray", "stability change"),
}


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(5.5, 3.8))
    return ax


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_complex():
            return x.numpy()
        return x.double().numpy()
    return np.asarray(x)


def fmt_param(p: float) -> str:
    """A parameter value for a label: 3 significant digits, round-off below 1e-12 shown as 0."""
    return "0" if abs(p) < 1e-12 else f"{p:.3g}"


def _get(obj: Any, *names: str, default: Any = None) -> Any:
    """First of ``names`` present as an attribute or a key of ``obj``."""
    for name in names:
        if isinstance(obj, Mapping) and name in obj:
            return obj[name]
        if not isinstance(obj, Mapping) and hasattr(obj, name):
            return getattr(obj, name)
    return default


# ----------------------------------------------------------------------------- density
def _density_arrays(density: Any) -> tuple[np.ndarray, np.ndarray, float, str]:
    if isinstance(density, (tuple, list)) and len(density) in (2, 3):
        grid, values = _np(density[0]), _np(density[1])
        zero = float(density[2]) if len(density) == 3 else 0.0
        return grid, values, zero, "linear"
    grid = _get(density, "grid", "x", "support")
    values = _get(density, "density", "values", "y")
    if grid is None or values is None:
        raise TypeError(
            f"expected a spectral density result (grid and density) or a tuple "
            f"(grid, density[, zero_mass]), got {type(density).__name__}"
        )
    zero = _get(density, "zero_mass", default=0.0)
    scale = _get(density, "scale", default="linear")
    return _np(grid), _np(values), float(zero or 0.0), str(scale)


def plot_spectral_density(
    density: Any, ax=None, log: bool = False, *, label: str | None = None, color=None, annotate: bool = True
):
    r"""Draw a spectral density ``φ(λ)`` of the sNTK.

    Parameters
    ----------
    density : SpectralDensity or tuple ``(grid, density[, zero_mass])``
        E.g. :func:`lanczos_ntk.spectral_density` of an SLQ result: the smoothed density on a
        grid of eigenvalues (of ``log10 λ`` when its ``scale`` is ``"log"``), and the fraction of
        eigenvalues at zero (at least ``(M - P) / M`` when ``M > P``), which the smooth part
        leaves out.
    ax : matplotlib Axes, optional
    log : bool
        Logarithmic axes (eigenvalue and density), which shows the bulk and the outliers at once.
    label, color : passed to the line.
    annotate : bool
        Write the zero mass in the corner (when it is positive).

    Returns
    -------
    Axes
    """
    ax = _axes(ax)
    grid, values, zero, scale = _density_arrays(density)
    if scale == "log":  # smoothed in log10 λ: a density per decade
        grid = 10.0**grid
    if log:
        floor = values.max() * 1e-4 if values.size and values.max() > 0 else 0.0
        keep = grid > 0
        shown = np.where(values[keep] >= floor, values[keep], np.nan)  # gaps below the floor
        ax.plot(grid[keep], shown, label=label, color=color)
        ax.set_xscale("log")
        ax.set_yscale("log")
        if floor > 0:
            lows = [np.nanmin(ln.get_ydata()) for ln in ax.lines if np.isfinite(ln.get_ydata()).any()]
            ax.set_ylim(bottom=min([floor, *lows]))
    else:
        ax.plot(grid, values, label=label, color=color)
        ax.fill_between(grid, values, alpha=0.15, color=ax.lines[-1].get_color())
        ax.set_ylim(bottom=0)
        if scale == "log":
            ax.set_xscale("log")
    ax.set_xlabel("eigenvalue λ of K")
    per = "per decade of λ" if scale == "log" else "per unit λ"
    ax.set_ylabel(f"density ({per}, fraction of M)")
    if annotate and zero > 0:
        ax.text(
            0.98,
            0.95,
            f"zero mass {zero:.3g}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round", "fc": "white", "alpha": 0.7},
        )
    if label is not None:
        ax.legend(fontsize=8)
    return ax


# ------------------------------------------------------------------------------- sweep
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


# ------------------------------------------------------------------ bifurcation diagram
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


# --------------------------------------------------------------------------- eigenvalues
def plot_eigenvalues(eigs: Any, ax=None, kind: str = "flow", *, label: str | None = None):
    r"""Eigenvalues in the complex plane with the stability boundary.

    Parameters
    ----------
    eigs : complex array ``[n]`` (or ``[F, n]``), or a result with ``eigenvalues``
    kind : {"flow", "map"}
        Flow: the imaginary axis (stable when ``Re λ < 0``); map: the unit circle (stable when
        ``|μ| < 1``). Unstable eigenvalues are drawn in red.

    Returns
    -------
    Axes
    """
    if kind not in ("flow", "map"):
        raise ValueError(f"expected kind 'flow' or 'map', got {kind!r}")
    ax = _axes(ax)
    if not isinstance(eigs, np.ndarray) and not hasattr(eigs, "detach") and hasattr(eigs, "eigenvalues"):
        eigs = eigs.eigenvalues
    z = _np(eigs).astype(complex).reshape(-1)
    unstable = z.real > 0 if kind == "flow" else np.abs(z) > 1
    boundary = not getattr(ax, "_lanczos_ntk_boundary", False)
    ax._lanczos_ntk_boundary = True
    if kind == "map" and boundary:
        t = np.linspace(0, 2 * np.pi, 361)
        ax.plot(np.cos(t), np.sin(t), color="gray", lw=1, label="unit circle |μ| = 1")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xlabel("Re μ")
        ax.set_ylabel("Im μ")
    elif boundary:
        ax.axvline(0.0, color="gray", lw=1, label="imaginary axis Re λ = 0")
        ax.set_xlabel("Re λ")
        ax.set_ylabel("Im λ")
    ax.scatter(
        z.real[~unstable],
        z.imag[~unstable],
        s=18,
        color="tab:blue" if label is None else None,
        label=label or "stable",
    )
    if unstable.any():
        ax.scatter(
            z.real[unstable],
            z.imag[unstable],
            s=24,
            color="tab:red",
            marker="x",
            label=f"{label} (unstable)" if label else "unstable",
        )
    ax.axhline(0.0, color="gray", lw=0.5)
    if kind == "flow":  # keep the boundary in view and avoid a zoom on round-off
        pts = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections] or [np.zeros((1, 2))])
        span = max(float(np.abs(pts).max()), 1.0) * 1.15
        lo, hi = pts.min(axis=0) - 0.05 * span, pts.max(axis=0) + 0.05 * span
        ax.set_xlim(min(-0.5 * span, lo[0]), max(0.5 * span, hi[0]))
        ax.set_ylim(min(-0.5 * span, lo[1]), max(0.5 * span, hi[1]))
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    return ax


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
