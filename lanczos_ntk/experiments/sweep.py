"""The spectral summary of one operator and the parameter sweep (the computations behind the
``spectrum``, ``density``, ``sweep``, ``demo`` and ``bifurcate`` commands): one sweep point, a whole
sweep, bifurcation diagrams.

No printing and no files here: the commands call these functions, save what they return and
show progress.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence

import torch

from .. import dynamics
from .._results import Result
from ..spectral import (
    DeflatedSLQ,
    EffectiveRank,
    EigshResult,
    TraceResult,
    as_operator,
    deflated_slq,
    effective_rank,
    eigsh,
    spectral_density,
    trace_from_slq,
)

__all__ = [
    "SpectralSummary",
    "SweepPoint",
    "SweepResult",
    "collect_sweep",
    "critical_gain",
    "density_of",
    "dynamics_at",
    "euler_line",
    "model_at",
    "spectral_summary",
    "stability_changes",
]


@dataclasses.dataclass(frozen=True)
class SpectralSummary(Result):
    """The spectral metrics of one sNTK: extreme eigenvalues, SLQ, effective ranks, trace.

    Attributes
    ----------
    top, bottom : EigshResult (``bottom`` None when not asked for)
    slq : DeflatedSLQ
        The top eigenvalues exactly plus SLQ of the deflated rest; feeds the ranks, the trace
        and the densities (no new products are needed to redraw them).
    participation, entropy : EffectiveRank
    trace : TraceResult
    condition : float
        ``λ_max / λ_min`` of the nonzero part (nan when the bottom was not computed).
    seconds : float
        Wall time of the computation.
    """

    top: EigshResult
    bottom: EigshResult | None
    slq: DeflatedSLQ
    participation: EffectiveRank
    entropy: EffectiveRank
    trace: TraceResult
    condition: float
    seconds: float

    def metrics(self) -> dict:
        """The headline numbers as plain Python values."""
        return {
            "top_eigenvalues": self.top.eigenvalues.tolist(),
            "top_residuals": self.top.residuals.tolist(),
            "bottom_eigenvalues": None if self.bottom is None else self.bottom.eigenvalues.tolist(),
            "null_dim": None if self.bottom is None else self.bottom.null_dim,
            "trace": self.trace.estimate,
            "trace_se": self.trace.standard_error,
            "participation_rank": self.participation.value,
            "participation_rank_se": self.participation.standard_error,
            "entropy_rank": self.entropy.value,
            "entropy_rank_se": self.entropy.standard_error,
            "condition_number": self.condition,
            "deflated_k": getattr(self.slq, "k", 0),
            "top_converged": self.top.converged.tolist(),
            "dimension_M": self.top.primal_dimension,
            "side": self.top.side,
            "matvecs": self.top.num_matvecs
            + self.slq.num_matvecs
            + (0 if self.bottom is None else self.bottom.num_matvecs),
            "status": self.top.status.value,
            "seconds": self.seconds,
        }


def spectral_summary(K, cfg: Mapping, generator: torch.Generator, progress=None) -> SpectralSummary:
    """Top-k (and bottom) eigenpairs by thick-restart Lanczos, then deflated SLQ (the top
    eigenpairs exactly, SLQ on the rest), ranks and trace of ``K``.

    ``progress(stage)`` is called after each of the three stages ("top", "bottom", "slq").
    """

    def done(stage):
        if progress is not None:
            progress(stage)

    t0 = time.perf_counter()
    A = as_operator(K)  # the smaller side: eigenvectors there seed the deflation
    top = eigsh(A, int(cfg["k"]), "LA", float(cfg["tol"]), generator=generator, return_eigenvectors=True)
    done("top")
    bottom = None
    if int(cfg["bottom"]) > 0:
        bottom = eigsh(A, int(cfg["bottom"]), "SA", float(cfg["tol"]), generator=generator)
    done("bottom")
    s = deflated_slq(
        A,
        int(cfg["num_probes"]),
        int(cfg["num_steps"]),
        generator=generator,
        tol=float(cfg["tol"]),
        eigenpairs=top,
    )
    top = dataclasses.replace(top, eigenvectors=None)  # not saved with the run
    done("slq")
    lmax = float(top.eigenvalues[0]) if len(top.eigenvalues) else math.nan
    cond = math.nan
    if bottom is not None and len(bottom.eigenvalues):
        lmin = float(bottom.eigenvalues.min())
        cond = lmax / lmin if lmin > 0 else math.inf
    return SpectralSummary(
        top=top,
        bottom=bottom,
        slq=s,
        participation=effective_rank(s, "participation"),
        entropy=effective_rank(s, "entropy"),
        trace=trace_from_slq(s),
        condition=cond,
        seconds=time.perf_counter() - t0,
    )


def density_of(summary_or_slq, cfg: Mapping):
    """The smoothed spectral density of an SLQ result with the ``[density]`` settings."""
    s = summary_or_slq.slq if isinstance(summary_or_slq, SpectralSummary) else summary_or_slq
    sigma = float(cfg["sigma"]) or None
    return spectral_density(s, sigma=sigma, num_points=int(cfg["num_points"]), scale=cfg["scale"])


# -------------------------------------------------------------------------- parameters
def critical_gain(model) -> float:
    """Gain at which the trivial fixed point of a zero-input tanh network loses stability.

    For the CTRNN (flow) ``A = -I + W`` at ``h = 0``: ``g_c = gain · 1 / max Re eig(W)``; for
    the discrete RNN (map) ``A = W``: ``g_c = gain / ρ(W)``. ``nan`` when it does not apply.
    """
    W = getattr(model, "W", None)
    gain = float(getattr(model, "gain", math.nan))
    if W is None or not math.isfinite(gain) or W.shape[0] != W.shape[1]:
        return math.nan
    eig = torch.linalg.eigvals(W.detach().double().cpu())
    scale = float(eig.real.max()) if model.kind == "flow" else float(eig.abs().max())
    return gain / scale if scale > 0 else math.nan


def check_param(model, param: str) -> None:
    """Raise ``ValueError`` unless ``param`` can be swept on ``model``."""
    names = dict(model.named_parameters())
    if param == "gain":
        if "W" not in names or not getattr(model, "gain", 0.0):
            raise ValueError(
                f"sweep.param='gain' needs a model with a parameter 'W' and a nonzero "
                f"attribute 'gain'; {type(model).__name__} has neither"
            )
    elif param not in ("input", "checkpoints") and param not in names:
        raise ValueError(
            f"unknown sweep parameter {param!r}; expected 'gain', 'input', "
            f"'checkpoints' or one of the model's parameters {sorted(names)}"
        )


def model_at(model, param: str, value: float, *, state: Mapping | None = None):
    """A copy of ``model`` with ``param`` set to ``value`` (the user's model is never changed).

    ``"gain"``: ``W ← value · W / gain``; a one-element parameter: set to ``value``; a larger
    parameter ``θ ← value · θ`` (as :func:`lanczos_ntk.dynamics.system_from_model`);
    ``"input"``: the model unchanged (the inputs are scaled); ``state``: a checkpoint loaded.
    """
    m = copy.deepcopy(model)
    with torch.no_grad():
        if state is not None:
            m.load_state_dict(state)
        elif param == "gain":
            m.W.mul_(value / float(model.gain))
            m.gain = float(value)
        elif param != "input":
            p = dict(m.named_parameters())[param]
            if p.numel() == 1:
                p.fill_(value)
            else:
                p.mul_(value)
    return m


def constant_input(inputs: torch.Tensor, how: str, group=None) -> torch.Tensor:
    """The constant input of the autonomous system: zeros or the mean over trials and time
    (over the trials of every rank of ``group``, where each holds its share).
    """
    if how == "zero":
        return torch.zeros(inputs.shape[-1], dtype=torch.float64)
    if how == "mean":
        x = inputs.double()
        total = torch.cat([x.sum(dim=(0, 1)), x.new_tensor([x.shape[0] * x.shape[1]])])
        if group is not None:
            torch.distributed.all_reduce(total, group=group)
        total = total.cpu()
        return total[:-1] / total[-1]
    raise ValueError(f"dynamics.input must be 'zero' or 'mean', got {how!r}")


def dynamics_at(model, u: torch.Tensor, cfg: Mapping, generator: torch.Generator):
    """Fixed points at the constant input ``u``; their leading eigenvalue and a stability signature.

    Returns ``(fixed_points, leading, signature)``: ``leading`` is ``max Re λ`` (flow) or
    ``max |μ| - 1`` (map) at the fixed point nearest the origin (positive: unstable);
    ``signature`` the sorted unstable-eigenvalue counts of all points found (a change between
    two sweep points is a stability change).
    """
    fp = dynamics.find_fixed_points(model, u=u, num_seeds=int(cfg["seeds"]), generator=generator)
    if len(fp) == 0:
        return fp, math.nan, []
    i = int(fp.points.norm(dim=1).argmin())
    ev = fp.eigenvalues[i]
    leading = float(ev.real.max()) if fp.kind == "flow" else float(ev.abs().max()) - 1.0
    # near a degenerate point Newton converges slowly and one point may be found twice
    kept: list[int] = []
    for j in range(len(fp)):
        x = fp.points[j]
        if not any(float((x - fp.points[k]).abs().max()) <= 1e-3 * (1 + float(x.abs().max())) for k in kept):
            kept.append(j)
    return fp, leading, sorted(int(fp.n_unstable[j]) for j in kept)


def euler_line(branches, param: str) -> tuple[dict | None, str | None]:
    """What the kernel sees for an Euler-simulated flow: the Euler map's stability changes on
    the continued branches (``max |1 + dt λ| = 1``), for the summary file and the terminal.
    """
    branches = [b for b in branches if b is not None and getattr(b, "dt", None)]
    if not branches:
        return None, None
    changes: list[float] = []
    for br in branches:
        for p in br.euler_stability_changes():
            if all(abs(p - q) > 1e-6 * (1 + abs(p)) for q in changes):
                changes.append(p)
    dt = branches[0].dt
    changes = [0.0 if abs(p) < 1e-12 else p for p in changes]
    where = (
        f"changes stability at {param} ≈ " + ", ".join(f"{p:.5g}" for p in sorted(changes))
        if changes
        else "keeps its stability on the continued branch"
    )
    return (
        {"dt": dt, "stability_changes": sorted(changes)},
        f"the trajectories, and so the kernel, follow the Euler map x ↦ x + dt·f (dt = {dt:g}); "
        f"its fixed point {where} (max |1 + dt λ| = 1; the flow's bifurcations are at Re λ = 0)",
    )


@dataclasses.dataclass(frozen=True)
class SweepPoint(Result):
    """Everything computed at one point of a sweep (saved as soon as it is finished)."""

    index: int
    value: float
    label: str
    spectrum: SpectralSummary
    fixed_points: Result | None
    leading: float
    signature: list
    seconds: float


def stability_changes(
    values: Sequence[float],
    signatures: Sequence[list],
    leading: Sequence[float] | None = None,
    zero: float = 1e-6,
) -> list[dict]:
    """Stability changes between consecutive sweep points (marked half-way).

    A change is a different signature (the sorted unstable-eigenvalue counts of the fixed points
    found) or a sign change of ``leading`` (values within ``zero`` of 0 count as critical and
    are skipped).
    """
    out = []
    lead = list(leading) if leading is not None else [math.nan] * len(values)
    for i in range(1, len(values)):
        a, b = signatures[i - 1], signatures[i]
        la, lb = lead[i - 1], lead[i]
        sign_change = (
            math.isfinite(la)
            and math.isfinite(lb)
            and abs(la) > zero
            and abs(lb) > zero
            and (la > 0) != (lb > 0)
        )
        if (a and b and a != b) or sign_change:
            out.append(
                {
                    "kind": "stability_change",
                    "p": 0.5 * (values[i - 1] + values[i]),
                    "between": [i - 1, i],
                    "before": a,
                    "after": b,
                }
            )
    return out


@dataclasses.dataclass(frozen=True)
class SweepResult(Result):
    """A whole sweep: metrics per point, detected bifurcations and the continued branch.

    Attributes
    ----------
    param : str
    values : tensor ``[N]``
        The swept values (checkpoint index for ``param="checkpoints"``).
    labels : list[str]
    eigenvalues : tensor ``[N, k]``
        Top eigenvalues of the sNTK, descending.
    participation, participation_se, entropy, entropy_se, trace, condition, leading : tensor ``[N]``
    bifurcations : list[dict]
        ``{"kind", "p", ...}``: the continuation's located points and the stability changes
        between sweep points (``kind = "stability_change"``).
    branch : Branch or None
        Continuation of the fixed point nearest the origin over the swept range.
    critical_value : float
        Predicted critical gain of the trivial fixed point (``nan`` when it does not apply).
    """

    param: str
    values: torch.Tensor
    labels: list
    eigenvalues: torch.Tensor
    participation: torch.Tensor
    participation_se: torch.Tensor
    entropy: torch.Tensor
    entropy_se: torch.Tensor
    trace: torch.Tensor
    condition: torch.Tensor
    leading: torch.Tensor
    bifurcations: list
    branch: Result | None
    critical_value: float


def collect_sweep(
    param: str, points: Sequence[SweepPoint], branch=None, critical_value: float = math.nan
) -> SweepResult:
    """Assemble the per-point results into a :class:`SweepResult`."""
    values = [p.value for p in points]
    k = max(len(p.spectrum.top.eigenvalues) for p in points)
    eig = torch.full((len(points), k), math.nan, dtype=torch.float64)
    for i, p in enumerate(points):
        e = p.spectrum.top.eigenvalues.double()
        eig[i, : len(e)] = e

    def col(f):
        return torch.tensor([float(f(p)) for p in points], dtype=torch.float64)

    bifs = stability_changes(values, [p.signature for p in points], [p.leading for p in points])
    if branch is not None:
        located = [{"kind": b.kind, "p": float(b.p), "source": "continuation"} for b in branch.bifurcations]
        # one event, one number: a change between two sweep points that the continuation
        # located is reported as the located point, with the sweep interval it fell in
        kept = []
        for c in bifs:
            lo, hi = sorted((values[c["between"][0]], values[c["between"][1]]))
            pad = 1e-6 * (hi - lo)  # a point located on a sweep value belongs to the interval
            inside = [b for b in located if lo - pad <= b["p"] <= hi + pad]
            for b in inside:
                b["sweep_interval"] = [lo, hi]
            if not inside:
                kept.append(c)
        bifs = kept + located
    return SweepResult(
        param=param,
        values=torch.tensor(values, dtype=torch.float64),
        labels=[p.label for p in points],
        eigenvalues=eig,
        participation=col(lambda p: p.spectrum.participation.value),
        participation_se=col(lambda p: p.spectrum.participation.standard_error),
        entropy=col(lambda p: p.spectrum.entropy.value),
        entropy_se=col(lambda p: p.spectrum.entropy.standard_error),
        trace=col(lambda p: p.spectrum.trace.estimate),
        condition=col(lambda p: p.spectrum.condition),
        leading=col(lambda p: p.leading),
        bifurcations=bifs,
        branch=branch,
        critical_value=float(critical_value),
    )


# ---------------------------------------------------------------------- continuation
def continue_branch(
    model,
    param: str,
    x0: torch.Tensor,
    p0: float,
    span: tuple[float, float],
    u: torch.Tensor,
    max_steps: int,
    direction: int = 1,
):
    """Pseudo-arclength continuation of a model's fixed point in ``param`` over ``span``."""
    return dynamics.continuation(
        model, x0, p0, span, param=param, u=u, max_steps=int(max_steps), direction=direction
    )
