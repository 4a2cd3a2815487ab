"""Detectors on recorded series: the crossing of the stability boundary, the collapse of the
effective rank, loss spikes.
"""

from __future__ import annotations

import torch

from ...track import first_crossing
from ._results import Crossing


# ----------------------------------------------------------------------------- detectors
def detect_crossing(steps, leading, num_stable=None, *, threshold: float = 0.0) -> Crossing:
    """First upward crossing of ``threshold`` (``0`` for a flow) by the leading eigenvalue.

    The crossing step is linearly interpolated between the two records around it. A series that
    starts at or above the threshold has no crossing. ``num_stable`` (optional) gives the first
    step where the number of stable fixed points changes.

    >>> c = detect_crossing([0, 1, 2, 3], [-0.3, -0.1, 0.1, 0.3])
    >>> round(c.step, 6), c.index
    (1.5, 2)
    """
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(leading, dtype=torch.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"expected steps and leading of the same length, got {s.numel()} and {y.numel()}")

    hit = first_crossing(s, y, threshold)
    step, index = hit if hit is not None else (None, None)
    below = y < threshold
    recross = 0
    if index is not None:
        b = below[index:].to(torch.int64)
        recross = int(((b[1:] - b[:-1]) == 1).sum())
    change = None
    if num_stable is not None:
        ns = torch.as_tensor(num_stable).reshape(-1)
        diff = torch.nonzero(ns != ns[0]).reshape(-1)
        change = int(s[int(diff[0])]) if diff.numel() else None
    return Crossing(step=step, index=index, stable_change_step=change, recrossings=recross)


def collapse_steps(steps, rank) -> dict:
    """Where the effective rank collapses: its minimum, its steepest drop, its half-drop point.

    ``steepest_step`` is the midpoint of the interval with the most negative
    ``Δrank / Δstep`` before the minimum; ``half_step`` the interpolated first step where the
    rank reaches ``(rank[0] + min)/2``.

    >>> collapse_steps([0, 1, 2, 3, 4], [5.0, 4.5, 3.0, 2.0, 2.5])["min_step"]
    3
    """
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    r = torch.as_tensor(rank, dtype=torch.float64).reshape(-1)
    i_min = int(torch.argmin(r))
    out = {
        "min_step": int(s[i_min]),
        "min_value": float(r[i_min]),
        "initial": float(r[0]),
        "steepest_step": float(s[0]),
        "half_step": float(s[0]),
    }
    if i_min == 0:
        return out
    slope = (r[1 : i_min + 1] - r[:i_min]) / (s[1 : i_min + 1] - s[:i_min])
    j = int(torch.argmin(slope))
    out["steepest_step"] = float(0.5 * (s[j] + s[j + 1]))
    half = 0.5 * (float(r[0]) + float(r[i_min]))
    for i in range(1, i_min + 1):
        if float(r[i]) <= half:
            y0, y1 = float(r[i - 1]), float(r[i])
            frac = (half - y0) / (y1 - y0) if y1 != y0 else 1.0
            out["half_step"] = float(s[i - 1] + frac * (s[i] - s[i - 1]))
            break
    return out


def spike_onsets(loss, *, factor: float = 10.0, start: int = 0) -> list[int]:
    """Indices ``t > start`` where ``loss[t] > factor · min(loss[start:t])`` starts to hold.

    >>> spike_onsets([1.0, 0.1, 0.01, 1.0, 0.5, 0.01, 0.001, 1.0])
    [3, 7]
    """
    y = torch.as_tensor(loss, dtype=torch.float64).reshape(-1)[int(start) :]
    if y.numel() < 2:
        return []
    run = torch.cummin(y, dim=0).values
    high = torch.zeros_like(y, dtype=torch.bool)
    high[1:] = y[1:] > factor * run[:-1]
    edges = high[1:] & ~high[:-1]
    return [int(i) + 1 + int(start) for i in torch.nonzero(edges).reshape(-1)]


def count_spikes(loss, *, factor: float = 10.0, start: int = 0) -> int:
    """Rising edges of ``loss[t] > factor · min(loss[start:t])`` for ``t > start``.

    >>> count_spikes([1.0, 0.1, 0.01, 1.0, 0.5, 0.01, 0.001, 1.0])
    2
    """
    return len(spike_onsets(loss, factor=factor, start=start))
