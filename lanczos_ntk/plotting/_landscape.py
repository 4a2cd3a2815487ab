"""The normal forms' finite-T amplification over (μ, initial state)."""

from __future__ import annotations

import numpy as np

__all__ = ["landscapes_figure"]


def landscapes_figure(results):
    """Rows: forms; columns: trial lengths; colour: ``log10 ‖D_μ h‖`` over ``(μ, α₀)``."""
    import matplotlib.pyplot as plt

    steps = results[0].steps.tolist()
    fig, axes = plt.subplots(
        len(results),
        len(steps),
        figsize=(3.2 * len(steps) + 1.2, 2.3 * len(results) + 0.6),
        squeeze=False,
        sharex=True,
        sharey=True,
        layout="constrained",
    )
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    for r, res in enumerate(results):
        amp = res.amplification.numpy()
        top = float(np.nanmax(amp)) if np.isfinite(amp).any() else 1.0
        with np.errstate(divide="ignore", invalid="ignore"):
            # rounding-level values (≤ 1e-12 of the largest) are zeros: grey, like diverged
            logs = np.log10(np.where(amp > 1e-12 * top, amp, np.nan))
        finite = logs[np.isfinite(logs)]
        # the colour range follows the bulk of the row: a few cells at an escape boundary may
        # be orders of magnitude above the rest (they show at the top of the bar, "extend")
        hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
        lo = max(float(finite.min()), hi - 6.0) if finite.size else 0.0
        extend = {
            (False, False): "neither",
            (True, False): "min",
            (False, True): "max",
            (True, True): "both",
        }[(bool(finite.size and finite.min() < lo), bool(finite.size and finite.max() > hi))]
        mu, al = res.mu.numpy(), res.alpha.numpy()
        for c, t in enumerate(steps):
            ax = axes[r, c]
            im = ax.imshow(
                logs[c].T,
                origin="lower",
                aspect="auto",
                vmin=lo,
                vmax=hi,
                extent=(mu[0], mu[-1], al[0], al[-1]),
                cmap=cmap,
            )
            ax.axvline(0.0, color="white", lw=0.6, ls=":")
            if r == 0:
                ax.set_title(f"T = {t}")
            if c == 0:
                ax.set_ylabel(f"{res.form}\ninitial state α₀")
            if r == len(results) - 1:
                ax.set_xlabel("unfolding parameter μ")
        fig.colorbar(im, ax=axes[r, :].tolist(), label="log10 ‖∂h/∂μ‖", shrink=0.9, extend=extend)
    fig.suptitle(
        f"‖∂h/∂μ‖ of the {results[0].kind} normal forms over T steps from h₀ = α₀ "
        f"(dotted: μ = 0; grey: zero, or escaped |h| > {results[0].escape:g})",
        fontsize=9,
    )
    return fig
