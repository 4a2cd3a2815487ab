"""Spectral densities, eigenvalues in the complex plane, and the spectrum / density figures."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import _axes, _get, _np, _pyplot

__all__ = ["plot_spectral_density", "plot_eigenvalues", "spectrum_figure", "density_figure"]


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


def spectrum_figure(summary, density):
    """Extreme eigenvalues (with residual bounds) and the spectral density on log axes."""
    plt = _pyplot()
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
    plot_spectral_density(density, b, log=True)
    b.set_title("spectral density (top exact + SLQ)", fontsize=9)
    fig.tight_layout()
    return fig


def density_figure(density_lin, density_log):
    """The density on linear and on logarithmic axes, zero mass annotated."""
    plt = _pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    plot_spectral_density(density_lin, a, log=False)
    a.set_title("linear scale", fontsize=9)
    plot_spectral_density(density_log, b, log=True)
    b.set_title("log scale (smoothed in log10 λ)", fontsize=9)
    fig.tight_layout()
    return fig
