"""Shared pieces of the figures: bifurcation styles, axes, labels, array conversion."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["BIFURCATION_STYLE", "fmt_param"]


#: Marker, colour and label of each bifurcation kind (shared by all figures).
BIFURCATION_STYLE = {
    "fold": ("v", "tab:red", "fold"),
    "branch_point": ("D", "tab:purple", "branch point"),
    "hopf": ("*", "tab:orange", "Hopf"),
    "flip": ("s", "tab:brown", "flip"),
    "neimark_sacker": ("P", "tab:pink", "Neimark–Sacker"),
    "stability_change": ("o", "tab:gray", "stability change"),
}


def _pyplot():
    """``matplotlib.pyplot``, imported on first use (the command line selects the Agg backend)."""
    import matplotlib.pyplot as plt

    return plt


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


def _param_label(param: str) -> str:
    return {"gain": "recurrent gain g", "input": "input level (× inputs)", "checkpoints": "checkpoint"}.get(
        param, f"parameter {param}"
    )


def _critical_line(ax, value: float) -> None:
    if math.isfinite(value):
        ax.axvline(value, color="black", ls=(0, (1, 3)), lw=1.0, label="predicted critical gain")
