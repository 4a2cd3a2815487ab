r"""Watch the sNTK during training: early warning of a bifurcation, and subtask interference.

Near a bifurcation of the trained network's dynamics the kernel announces it: the top eigenvalue
of ``G = Jᵀ J`` grows like ``λ_c⁻²`` (``λ_c`` the distance of the leading Jacobian eigenvalue
from the stability boundary), the effective rank falls and the top eigenvector turns into the
bifurcation channel. :class:`KernelTracker` records all of it inside a user's own training loop,
every ``every`` steps, each record warm-started from the previous one:

* the top-``k`` eigenpairs of ``G``, tracked from the previous record by one step of subspace
  iteration (one block product; a warm-started :func:`lanczos_ntk.eigsh` when a residual is
  too large), with their residuals, and the participation rank with the top pairs exact and
  Hutchinson probes on the rest;
* the model's fixed points at a constant input, continued from the previous record (Newton from
  the previous points; the trials' final states join as seeds), the tracked one's leading
  eigenvalue ``λ_c`` (``Re λ`` for a flow, ``|μ| − 1`` for a map), its critical directions ``g``
  and ``d = dλ_c/dθ`` (:func:`lanczos_ntk.channels.critical_direction`), the alignment of the
  kernel's top eigenvector with them, and the gradient's projection on them;
* an estimate of the step at which ``λ_c`` reaches 0 (:func:`estimate_crossing`), and a
  :class:`BifurcationWarning` (a Python warning, and a flag in the record) when it is closer than
  ``horizon`` steps.

Estimates of the crossing step, from the last ``window`` records (least squares):

* ``linear``: ``λ_c`` linear in the step, exact where the leading eigenvalue moves linearly
  with the parameters (a branch point of a trivial fixed point: ``λ_c = −1 + w`` for a 1-unit
  CTRNN);
* ``fold``: ``λ_c²`` linear in the step, exact at a fold (``λ_c ∝ √(s* − s)``), where the
  linear estimate is twice too far;
* ``kernel``: ``λ_top^{−1/2}`` linear in the step (the ``λ_top ∝ λ_c⁻²`` law of a dominant
  static channel), a cross-check read from the kernel alone.

The warning uses the nearest of ``linear`` and ``fold`` (a fold's true distance is half the
linear one). Both are extrapolations from the last records: where ``λ_c`` bends towards the
boundary (a fold approached from far away, where ``λ_c`` is not yet ``∝ √(s* − s)``) they
are late, by less the closer the records come (for a 1-unit CTRNN driven through a fold, the
``fold`` estimate is off by 28% of the remaining steps with 5 left, 40% with 13 left); set the
horizon with that margin.

:func:`interference` predicts how a step on one subtask changes the loss of another,
``ΔL_b ≈ −η ∇_h L_bᵀ K ∇_h L_a`` (one ``Jᵀ`` product per subtask).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from torch import nn

from ._results import Result
from .channels import critical_direction
from .dynamics import find_fixed_points
from .linalg import subspace_step
from .operators import StateNTK, resolve_params
from .spectral import eigsh

__all__ = [
    "BifurcationWarning",
    "CrossingEstimate",
    "Interference",
    "KernelTracker",
    "TrackRecords",
    "TrainingTrack",
    "estimate_crossing",
    "interference",
    "train_tracked",
]


class BifurcationWarning(UserWarning):
    """Training is estimated to push the dynamics through a bifurcation within the horizon."""


@dataclasses.dataclass(frozen=True)
class CrossingEstimate(Result):
    """Where the leading eigenvalue is estimated to reach the stability boundary.

    ``linear``, ``fold``, ``kernel``: estimated crossing steps (module docstring; ``nan`` when
    the series is not approaching the boundary or too short); ``step``: the nearest of
    ``linear`` and ``fold`` (what a warning uses); ``steps_left``: ``step`` minus the last
    recorded step.
    """

    linear: float
    fold: float
    kernel: float
    step: float
    steps_left: float


def _fit_zero(s: torch.Tensor, y: torch.Tensor) -> float:
    """The step where the least-squares line through ``(s, y)`` reaches 0, if ``y`` rises
    towards 0 from below; ``nan`` otherwise.
    """
    if s.numel() < 2 or not bool(torch.isfinite(y).all()):
        return math.nan
    sm, ym = s.mean(), y.mean()
    var = ((s - sm) ** 2).sum()
    if float(var) == 0.0:
        return math.nan
    slope = float(((s - sm) * (y - ym)).sum() / var)
    if not slope > 0 or not float(y[-1]) < 0:
        return math.nan
    return float(sm) - float(ym) / slope


def estimate_crossing(steps, leading, top_eigenvalue=None, *, window: int = 4) -> CrossingEstimate:
    """Estimate the training step at which ``leading`` (``λ_c < 0``: stable) reaches 0.

    Parameters
    ----------
    steps : sequence of float
        Recorded training steps.
    leading : sequence of float
        ``λ_c`` at each record (``Re λ`` of a flow's leading eigenvalue, ``|μ| − 1`` of a map's).
    top_eigenvalue : sequence of float, optional
        ``λ_max(G)`` at each record, for the ``kernel`` estimate.
    window : int
        Records used (the last ``window``), at least 2.

    Returns
    -------
    CrossingEstimate

    Examples
    --------
    >>> e = estimate_crossing([0, 10, 20], [-0.3, -0.2, -0.1])
    >>> round(e.linear, 6), round(e.fold, 2), round(e.steps_left, 2)  # the nearer one counts
    (30.0, 21.67, 1.67)
    """
    if int(window) < 2:
        raise ValueError(f"expected window >= 2, got {window}")
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(leading, dtype=torch.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"expected steps and leading of the same length, got {s.numel()} and {y.numel()}")
    s, y = s[-int(window) :], y[-int(window) :]
    linear = _fit_zero(s, y)
    fold = _fit_zero(s, -(y**2)) if bool((y < 0).all()) else math.nan
    kernel = math.nan
    if top_eigenvalue is not None:
        lam = torch.as_tensor(top_eigenvalue, dtype=torch.float64).reshape(-1)[-int(window) :]
        if lam.shape == s.shape and bool((lam > 0).all()):
            kernel = _fit_zero(s, -lam.rsqrt())
    candidates = [v for v in (linear, fold) if math.isfinite(v)]
    step = min(candidates) if candidates else math.nan
    last = float(s[-1]) if s.numel() else math.nan
    return CrossingEstimate(
        linear=linear,
        fold=fold,
        kernel=kernel,
        step=step,
        steps_left=step - last if math.isfinite(step) else math.nan,
    )


@dataclasses.dataclass(frozen=True)
class TrackRecords(Result):
    """What a :class:`KernelTracker` recorded (``R`` records, ``k`` eigenvalues).

    Attributes
    ----------
    steps : Tensor ``[R]`` (long)
    eigenvalues : Tensor ``[R, k]``
        Top eigenvalues of ``G``, descending, with their ``residuals`` ``‖G x − θ x‖``.
    participation : Tensor ``[R]``
        Participation rank ``(tr G)² / tr G²`` (the top pairs exact, Hutchinson on the rest),
        with ``participation_se``.
    leading : Tensor ``[R]``
        ``λ_c`` of the tracked fixed point (``nan`` without dynamics or without a fixed point).
    num_fixed_points, num_stable : Tensor ``[R]`` (long)
    channel_cos, sensitivity_cos : Tensor ``[R]``
        ``‖Q_gᵀ u₁‖`` and ``|cos(u₁, d)|``: the top eigenvector ``u₁`` of ``G`` against the
        critical directions.
    gradient_channel_cos, gradient_sensitivity_cos : Tensor ``[R]``
        The same for the loss gradient (``nan`` when no loss was given).
    estimated_crossing, steps_left : Tensor ``[R]``
        :class:`CrossingEstimate` ``step`` and ``steps_left`` after each record.
    estimated_linear, estimated_fold, estimated_kernel : Tensor ``[R]``
    warned : Tensor ``[R]`` (bool)
        Whether the record raised a :class:`BifurcationWarning`.
    horizon : float
    kind : str
        ``"flow"`` or ``"map"`` (``""`` without dynamics).
    num_matvecs : int
        Products with ``G`` over all records.
    seconds : float
        Time spent recording.
    """

    steps: torch.Tensor
    eigenvalues: torch.Tensor
    residuals: torch.Tensor
    participation: torch.Tensor
    participation_se: torch.Tensor
    leading: torch.Tensor
    num_fixed_points: torch.Tensor
    num_stable: torch.Tensor
    channel_cos: torch.Tensor
    sensitivity_cos: torch.Tensor
    gradient_channel_cos: torch.Tensor
    gradient_sensitivity_cos: torch.Tensor
    estimated_crossing: torch.Tensor
    steps_left: torch.Tensor
    estimated_linear: torch.Tensor
    estimated_fold: torch.Tensor
    estimated_kernel: torch.Tensor
    warned: torch.Tensor
    horizon: float
    kind: str
    num_matvecs: int
    seconds: float

    @property
    def first_warning(self) -> int | None:
        """The first recorded step that raised a warning (``None``: none did)."""
        hits = torch.nonzero(self.warned).reshape(-1)
        return int(self.steps[int(hits[0])]) if hits.numel() else None


_FIELDS = (
    "steps",
    "eig",
    "res",
    "pr",
    "pr_se",
    "lead",
    "nfp",
    "nst",
    "ccos",
    "dcos",
    "gcos",
    "gdcos",
    "est",
    "left",
    "lin",
    "fold",
    "kern",
    "warned",
)


# a record's dynamics columns without a tracked fixed point (or without dynamics)
_NO_DYNAMICS = {
    "lead": math.nan,
    "nfp": 0,
    "nst": 0,
    "ccos": math.nan,
    "dcos": math.nan,
    "gcos": math.nan,
    "gdcos": math.nan,
}


class KernelTracker:
    """Record the sNTK's spectrum and the model's dynamics during training (module docstring).

    Call :meth:`step` once per training step (it records every ``every`` steps) or
    :meth:`record` when you choose; :attr:`records` gives a :class:`TrackRecords`.

    Parameters
    ----------
    model : nn.Module
        The model being trained (read at each record, never changed).
    inputs : Tensor ``[B, T, d_in]``
        Inputs on which ``J`` is evaluated (:meth:`set_inputs` replaces them).
    every : int
        Record every ``every`` steps (:meth:`step`). A record costs about 20 products with
        ``G`` once the tracking runs (about 20 training steps of a CTRNN; ``bench_track.py``):
        the default 100 keeps the overhead near 1.2×.
    k : int
        Top eigenvalues of ``G`` per record.
    horizon : float, optional
        Warn when the crossing is estimated fewer than ``horizon`` steps ahead (default: no
        warning, the estimate is still recorded).
    window : int
        Records used by :func:`estimate_crossing`.
    u : Tensor ``[d_in]``, optional
        Constant input of the dynamics (default zeros); fixed points need a model with
        ``rhs`` and ``kind`` (:mod:`lanczos_ntk.models`); other models get the kernel alone.
    dynamics : bool
        Track fixed points and critical directions (default: when the model has ``rhs``).
    params, outputs, h0, process_group :
        As for :class:`lanczos_ntk.StateNTK`.
    tol : float
        Relative tolerance of the eigensolver (first record, and when tracking falls back).
    track_tol : float
        Between records the top pairs are tracked by one step of subspace iteration (one block
        product of ``k + 2`` vectors); when a pair's residual exceeds ``track_tol · λ₁`` the
        record falls back to a warm-started Lanczos solve. The residuals are recorded.
    search_every : int
        Fixed points are continued from the last record's points (a few Newton steps); every
        ``search_every`` records the search also starts from the trials' final states, so that
        points born at a bifurcation join the records.
    num_probes : int
        Hutchinson probes for the participation rank ``(tr G)² / tr G²`` beyond the top pairs
        (one block product; their spread is the rank's standard error).
    generator : torch.Generator, optional
        Eigensolver starts, probes and fixed-point seeds (default: seeded with 0).
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        *,
        every: int = 100,
        k: int = 6,
        horizon: float | None = None,
        window: int = 4,
        u: torch.Tensor | None = None,
        dynamics: bool | None = None,
        params=None,
        outputs="states",
        h0=None,
        process_group=None,
        tol: float = 1e-6,
        num_probes: int = 8,
        track_tol: float = 1e-2,
        search_every: int = 10,
        generator: torch.Generator | None = None,
    ):

        if int(every) < 1 or int(k) < 1:
            raise ValueError(f"expected every >= 1 and k >= 1, got {every} and {k}")
        if horizon is not None and not horizon > 0:
            raise ValueError(f"expected a positive horizon (steps), got {horizon}")
        if int(window) < 2:
            raise ValueError(f"expected window >= 2, got {window}")
        if int(search_every) < 1:
            raise ValueError(f"expected search_every >= 1, got {search_every}")
        self.model, self.inputs = model, inputs
        self.every, self.k, self.horizon, self.window = int(every), int(k), horizon, int(window)
        self.names = tuple(resolve_params(model, params))
        self._kw = {"outputs": outputs, "params": list(self.names), "h0": h0, "process_group": process_group}
        has_rhs = hasattr(model, "rhs") and hasattr(model, "kind")
        self.dynamics = has_rhs if dynamics is None else bool(dynamics)
        if self.dynamics and not has_rhs:
            raise ValueError(
                f"dynamics=True needs a model with rhs(h, u) and kind; {type(model).__name__} has none"
            )
        self.kind = str(model.kind) if self.dynamics else ""
        d_in = int(getattr(model, "input_size", inputs.shape[-1]))
        self.u = (
            torch.zeros(d_in, dtype=torch.float64)
            if u is None
            else torch.as_tensor(u, dtype=torch.float64).reshape(-1)
        )
        self.tol, self.num_probes = float(tol), int(num_probes)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self._rec: dict[str, list] = {f: [] for f in _FIELDS}
        self._v0: torch.Tensor | None = None
        self._basis: torch.Tensor | None = None
        self.search_every = int(search_every)
        self._since_search = 0
        self.track_tol = float(track_tol)
        self._tracked: torch.Tensor | None = None
        self._known: torch.Tensor | None = None
        self.num_matvecs = 0
        self.seconds = 0.0

    def set_inputs(self, inputs: torch.Tensor, h0=None) -> None:
        """Evaluate ``G`` on new inputs from the next record on."""
        self.inputs = inputs
        self._kw["h0"] = h0

    def step(self, step: int, loss: torch.Tensor | None = None) -> dict | None:
        """Record if ``step`` is a multiple of ``every``; returns the record (or ``None``)."""
        return self.record(step, loss) if int(step) % self.every == 0 else None

    # ------------------------------------------------------------------------------ record
    def record(self, step: int, loss: torch.Tensor | None = None) -> dict:
        """Record now. ``loss`` (a scalar still attached to its graph) adds the gradient's
        projections; its graph is kept (``retain_graph``) for the caller's ``backward``.
        """
        import time

        t0 = time.perf_counter()
        G = StateNTK(self.model, self.inputs, **self._kw).dual()
        values, vectors, residuals = self._top(G)
        pr, pr_se = self._participation(G, values, vectors)
        u1 = vectors[:, 0].to(torch.float64)
        grad = self._gradient(loss)
        row: dict[str, Any] = {"steps": int(step), "eig": values, "res": residuals, "pr": pr, "pr_se": pr_se}
        row.update(self._dynamics(u1, grad) if self.dynamics else _NO_DYNAMICS)
        for key, v in row.items():
            self._rec[key].append(v)
        est = estimate_crossing(
            self._rec["steps"], self._rec["lead"], [float(e[0]) for e in self._rec["eig"]], window=self.window
        )
        warned = bool(
            self.horizon is not None and math.isfinite(est.steps_left) and est.steps_left < self.horizon
        )
        more = {
            "est": est.step,
            "left": est.steps_left,
            "lin": est.linear,
            "fold": est.fold,
            "kern": est.kernel,
            "warned": warned,
        }
        for key, v in more.items():
            self._rec[key].append(v)
        row.update(more)
        self.seconds += time.perf_counter() - t0
        if warned:
            warnings.warn(
                BifurcationWarning(
                    f"step {step}: the leading eigenvalue ({row['lead']:.3g}) is estimated to cross "
                    f"the stability boundary near step {est.step:.1f}, {est.steps_left:.1f} steps "
                    f"ahead (horizon {self.horizon:g}); top eigenvalue of G "
                    f"{float(values[0]):.4g}, participation rank {pr:.3g}"
                ),
                stacklevel=2,
            )
        return row

    def _top(self, G) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-``k`` eigenpairs of ``G`` and their residuals ``‖G x − θ x‖``: one step of
        subspace iteration from the last record's basis (``k + 2`` vectors, one block
        product), or a warm-started :func:`~lanczos_ntk.eigsh` when a tracked pair's residual
        exceeds ``track_tol · θ₁`` (and at the first record).
        """
        P = G.shape[0]
        k = min(self.k, P)
        if self._basis is not None:
            step = subspace_step(lambda X: G.matmul(X.to(G.dtype)).to(torch.float64), self._basis)
            self.num_matvecs += self._basis.shape[1]
            if bool((step.residuals[:k] <= self.track_tol * step.eigenvalues[0].abs()).all()):
                self._basis = step.basis
                return step.eigenvalues[:k], step.eigenvectors[:, :k], step.residuals[:k]
            self._v0 = step.eigenvectors[:, :k]
        top = eigsh(G, k=k, tol=self.tol, return_eigenvectors=True, v0=self._v0, generator=self.generator)
        self.num_matvecs += int(top.num_matvecs)
        assert top.eigenvectors is not None  # asked for
        X = top.eigenvectors.to(torch.float64)
        self._v0 = X
        width = min(k + 2, P)
        if width > X.shape[1]:
            extra = torch.randn(P, width - X.shape[1], dtype=torch.float64, generator=self.generator).to(
                X.device
            )
            X = torch.cat([X, extra], dim=1)
        self._basis = torch.linalg.qr(X).Q
        return (
            top.eigenvalues.to(torch.float64),
            X[:, :k],
            top.residuals.to(torch.float64),
        )

    def _participation(self, G, values, vectors) -> tuple[float, float]:
        """``(tr G)² / tr G²`` with the top pairs exact and the rest by Hutchinson:
        ``R = (I − XXᵀ) G (I − XXᵀ)``, ``tr R = E zᵀRz`` and ``tr R² = E ‖Rz‖²`` from
        ``num_probes`` Rademacher probes (one block product); the standard error from their
        spread (delta method).
        """
        X = vectors.to(torch.float64)
        m = self.num_probes
        Z = (
            torch.randint(0, 2, (X.shape[0], m), generator=self.generator, dtype=torch.float64)
            .mul_(2)
            .sub_(1)
            .to(X.device)
        )
        Z = Z - X @ (X.T @ Z)
        Y = G.matmul(Z.to(G.dtype)).to(torch.float64)
        Y = Y - X @ (X.T @ Y)
        self.num_matvecs += m
        a, b = (Z * Y).sum(dim=0), (Y * Y).sum(dim=0)
        s1 = float(values.clamp_min(0).sum() + a.mean())
        s2 = float((values.clamp_min(0) ** 2).sum() + b.mean())
        if not s2 > 0:
            return math.nan, math.nan
        pr = s1 * s1 / s2
        if m < 2:
            return pr, math.inf
        g = torch.tensor([2 * s1 / s2, -s1 * s1 / (s2 * s2)], dtype=torch.float64)
        C = torch.cov(torch.stack([a, b])) / m
        return pr, float((g @ C @ g).clamp_min(0).sqrt())

    def _gradient(self, loss) -> torch.Tensor | None:
        if loss is None:
            return None
        named = dict(self.model.named_parameters())
        grads = torch.autograd.grad(
            loss, [named[n] for n in self.names], retain_graph=True, allow_unused=True
        )
        flat = (
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(named[n])).reshape(-1)
                    for g, n in zip(grads, self.names)
                ]
            )
            .detach()
            .to(torch.float64)
        )
        group = self._kw["process_group"]
        if group is not None:
            torch.distributed.all_reduce(flat, group=group)
        return flat / torch.linalg.vector_norm(flat).clamp_min(1e-300)

    def _dynamics(self, u1: torch.Tensor, grad: torch.Tensor | None) -> dict:
        """Fixed points continued from the last record; the tracked one's critical data."""
        model = self.model
        n = int(model.state_size)  # type: ignore[arg-type]  # (nn.Module attributes type as Module)
        origin = torch.zeros(1, n, dtype=torch.float64)
        fp = None
        self._since_search += 1
        if self._known is not None and self._since_search < self.search_every:
            # continued: a few steps from the last record's points
            fp = find_fixed_points(
                model,
                torch.cat([self._known, origin]),
                u=self.u,
                generator=self.generator,
                opt_steps=5,
                newton_steps=8,
            )
        if fp is None or len(fp) == 0:  # first record, lost, or due: search from the trials too
            self._since_search = 0
            with torch.no_grad():
                states = model(self.inputs.to(next(model.parameters()).dtype))
            states = (states[0] if isinstance(states, tuple) else states)[:, -1]
            states = states.reshape(-1, n).to(torch.float64)
            group = self._kw["process_group"]
            if group is not None:  # every rank searches from every rank's trials: same points
                parts: list = [None] * torch.distributed.get_world_size(group)
                torch.distributed.all_gather_object(parts, states.cpu(), group=group)
                states = torch.cat(parts).to(states.device)
            known = self._known if self._known is not None else origin[:0]
            seeds = torch.cat([known, origin, states])
            fp = find_fixed_points(
                model, seeds, u=self.u, generator=self.generator, opt_steps=40, newton_steps=8
            )
        nan = dict(_NO_DYNAMICS, nfp=len(fp), nst=int(fp.stable.sum()) if len(fp) else 0)
        if len(fp) == 0:
            return nan
        ref = self._tracked if self._tracked is not None else origin[0]
        i = int(torch.argmin(torch.linalg.vector_norm(fp.points - ref, dim=1)))
        self._tracked, self._known = fp.points[i].detach(), fp.points.detach()
        lam = fp.eigenvalues[i, 0]
        lead = float(lam.real) if self.kind == "flow" else float(lam.abs()) - 1.0
        out = dict(nan, lead=lead)
        try:
            cd = critical_direction(model, self._tracked, self.u, params=list(self.names))
        except ValueError:
            return out
        Q = torch.linalg.qr(cd.g.to(torch.float64)).Q
        d = cd.d[:, 0].to(torch.float64)
        d = d / torch.linalg.vector_norm(d).clamp_min(1e-300)
        out.update(ccos=float(torch.linalg.vector_norm(Q.T @ u1)), dcos=float((d @ u1).abs()))
        if grad is not None:
            out.update(gcos=float(torch.linalg.vector_norm(Q.T @ grad)), gdcos=float((d @ grad).abs()))
        return out

    # ------------------------------------------------------------------------------ results
    @property
    def fixed_points(self) -> torch.Tensor | None:
        """The fixed points found at the last record ``[F, n]`` (``None`` before any)."""
        return None if self._known is None else self._known.clone()

    @property
    def records(self) -> TrackRecords:
        """Every record so far, as a result object (save / load / plot)."""
        r = self._rec
        f64 = torch.float64
        width = max([e.numel() for e in r["eig"]], default=0)

        def padded(key):
            return (
                torch.stack(
                    [torch.nn.functional.pad(e, (0, width - e.numel()), value=math.nan) for e in r[key]]
                )
                if r[key]
                else torch.zeros(0, 0, dtype=f64)
            )

        eig = padded("eig")

        def t(key, dtype=f64):
            return torch.tensor(r[key], dtype=dtype)

        return TrackRecords(
            steps=t("steps", torch.long),
            eigenvalues=eig,
            residuals=padded("res"),
            participation=t("pr"),
            participation_se=t("pr_se"),
            leading=t("lead"),
            num_fixed_points=t("nfp", torch.long),
            num_stable=t("nst", torch.long),
            channel_cos=t("ccos"),
            sensitivity_cos=t("dcos"),
            gradient_channel_cos=t("gcos"),
            gradient_sensitivity_cos=t("gdcos"),
            estimated_crossing=t("est"),
            steps_left=t("left"),
            estimated_linear=t("lin"),
            estimated_fold=t("fold"),
            estimated_kernel=t("kern"),
            warned=t("warned", torch.bool),
            horizon=math.nan if self.horizon is None else float(self.horizon),
            kind=self.kind,
            num_matvecs=int(self.num_matvecs),
            seconds=float(self.seconds),
        )


# ---------------------------------------------------------------------------- a tracked run
@dataclasses.dataclass(frozen=True)
class TrainingTrack(Result):
    """A model trained by SGD with a :class:`KernelTracker` on (:func:`train_tracked`).

    ``loss``: before each step and after the last; ``crossing_step``: where the tracked fixed
    point's ``λ_c`` first reached 0, interpolated between records (``None``: it did not, or no
    dynamics); ``first_warning``: the first record that warned; ``lead_time``: crossing minus
    first warning (``None`` without both); ``estimate_at_warning``: the crossing step estimated
    at that record; ``overhead``: (training + recording) / training time.
    """

    records: TrackRecords
    loss: torch.Tensor
    num_steps: int
    crossing_step: float | None
    first_warning: int | None
    lead_time: float | None
    estimate_at_warning: float | None
    seconds_train: float
    seconds_track: float
    overhead: float


def first_crossing(steps, leading, threshold: float = 0.0) -> tuple[float, int] | None:
    """The first record where ``leading`` rises from below ``threshold`` to it or above.

    Returns ``(step, index)``: the step linearly interpolated between the two records (the later
    record's step when the earlier value is not finite) and the later record's index; ``None``
    without a crossing. A ``nan`` does not count as below (map it to ``-inf`` to make it so).
    """
    s = torch.as_tensor(steps, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(leading, dtype=torch.float64).reshape(-1)
    below = y < threshold
    for i in range(1, y.numel()):
        if bool(below[i - 1]) and not bool(below[i]):
            y0, y1 = float(y[i - 1]), float(y[i])
            frac = (threshold - y0) / (y1 - y0) if math.isfinite(y0) and y1 != y0 else 1.0
            return float(s[i - 1] + frac * (s[i] - s[i - 1])), i
    return None


def train_tracked(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    lr: float,
    num_steps: int,
    every: int = 2,
    horizon: float | None = 10.0,
    generator: torch.Generator | None = None,
    progress=None,
    **tracker_kwargs,
) -> TrainingTrack:
    """Train ``model`` by SGD on the mean squared error to ``targets`` (its states
    ``[B, T, n]``) for ``num_steps`` steps, with a :class:`KernelTracker` recording every
    ``every`` steps (``tracker_kwargs`` go to it). Warnings are recorded, not raised.

    ``progress(done, total)`` is called after every step. The model is trained in place.
    """
    import time

    if not lr > 0 or int(num_steps) < 1:
        raise ValueError(f"expected lr > 0 and num_steps >= 1, got {lr} and {num_steps}")
    with torch.no_grad():
        out = model(inputs)
    out = out[0] if isinstance(out, tuple) else out
    if tuple(out.shape) != tuple(targets.shape):
        raise ValueError(
            f"expected targets of the states' shape {list(out.shape)} "
            f"[trials, steps, n], got {list(targets.shape)}"
        )
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=float(lr))
    tracker = KernelTracker(
        model, inputs, every=every, horizon=horizon, generator=generator, **tracker_kwargs
    )
    losses: list[float] = []
    t_train, S = 0.0, int(num_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BifurcationWarning)  # the records carry them
        for step in range(S + 1):
            t0 = time.perf_counter()
            opt.zero_grad()
            states = model(inputs)
            states = states[0] if isinstance(states, tuple) else states
            loss = ((states - targets) ** 2).mean()
            losses.append(float(loss.detach()))
            t_train += time.perf_counter() - t0
            tracker.step(step, loss)
            if step == S:
                break
            t0 = time.perf_counter()
            loss.backward()
            opt.step()
            t_train += time.perf_counter() - t0
            if progress is not None:
                progress(step + 1, S)
    rec = tracker.records
    hit = first_crossing(rec.steps, torch.nan_to_num(rec.leading, nan=-math.inf))
    crossing = hit[0] if hit is not None else None
    warn = rec.first_warning
    est = None
    if warn is not None:
        est = float(rec.estimated_crossing[int(torch.nonzero(rec.steps == warn)[0])])
    return TrainingTrack(
        records=rec,
        loss=torch.tensor(losses, dtype=torch.float64),
        num_steps=S,
        crossing_step=crossing,
        first_warning=warn,
        lead_time=crossing - warn if crossing is not None and warn is not None else None,
        estimate_at_warning=est,
        seconds_train=t_train,
        seconds_track=rec.seconds,
        overhead=(t_train + rec.seconds) / max(t_train, 1e-12),
    )


# ---------------------------------------------------------------------------- interference
@dataclasses.dataclass(frozen=True)
class Interference(Result):
    """``matrix[b, a] = ∇_h L_bᵀ K ∇_h L_a``; a gradient step of size ``η`` on subtask ``a``
    changes the loss of subtask ``b`` by ``predicted(η)[b, a] = −η · matrix[b, a]`` to first
    order. ``names``: the subtasks. ``channel_matrix``: the part that passes through the
    parameter directions given as ``channel`` (``vᵀ Π v`` with ``v = Jᵀ ∇_h L``, ``Π`` the
    projector on them; ``None`` without ``channel``), and :attr:`channel_share` its fraction.
    """

    matrix: torch.Tensor
    names: tuple[str, ...]
    channel_matrix: torch.Tensor | None = None

    @property
    def channel_share(self) -> torch.Tensor | None:
        """``channel_matrix / matrix`` entrywise: how much of each interference the channel
        carries (near a bifurcation, close to 1).
        """
        if self.channel_matrix is None:
            return None
        return self.channel_matrix / self.matrix

    def predicted(self, lr: float) -> torch.Tensor:
        """First-order loss changes ``ΔL_b`` (rows) of a step of size ``lr`` on ``a`` (columns)."""
        return -float(lr) * self.matrix


def interference(K, state_gradients, names=None, *, channel=None) -> Interference:
    """The subtask interference matrix of the sNTK ``K``.

    Parameters
    ----------
    K : StateNTK
    state_gradients : sequence of Tensor
        ``∇_h L_a`` for each subtask ``a``, shaped like the states ``[B, T, n]`` (or flat
        ``[M]``); zero outside the subtask's trials, times or units.
    names : sequence of str, optional
    channel : Tensor ``[P]`` or ``[P, r]``, optional
        Parameter directions of the bifurcation channel (e.g. ``critical_direction(...).g``):
        adds the interference carried by their span.

    Returns
    -------
    Interference
        ``matrix = Vᵀ V`` with ``V = Jᵀ [∇_h L_a]_a``: one block of ``Jᵀ`` products, symmetric
        positive semi-definite.
    """
    grads = [torch.as_tensor(g).reshape(-1) for g in state_gradients]
    if not grads:
        raise ValueError("expected at least one subtask gradient")
    M = K.shape[0]
    bad = [i for i, g in enumerate(grads) if g.numel() != M]
    if bad:
        raise ValueError(
            f"expected state gradients with M = {M} entries (the states "
            f"[B, T, n] of K), got {[grads[i].numel() for i in bad]} for subtask(s) "
            f"{bad}"
        )
    V = K.vjp(torch.stack(grads, dim=1).to(dtype=K.dtype))
    names = tuple(names) if names is not None else tuple(f"task{i}" for i in range(len(grads)))
    if len(names) != len(grads):
        raise ValueError(f"expected {len(grads)} names, got {len(names)}")
    part = None
    if channel is not None:
        C = torch.as_tensor(channel).to(V)
        C = C[:, None] if C.dim() == 1 else C
        if C.dim() != 2 or C.shape[0] != V.shape[0]:
            raise ValueError(
                f"expected channel directions of shape [{V.shape[0]}] or "
                f"[{V.shape[0]}, r], got {tuple(torch.as_tensor(channel).shape)}"
            )
        c = torch.linalg.qr(C).Q.T @ V
        part = (c.T @ c).to(torch.float64)
    return Interference(matrix=(V.T @ V).to(torch.float64), names=names, channel_matrix=part)
