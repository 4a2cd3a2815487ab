r"""Bifurcation-channel decomposition of the state-space NTK.

Near a bifurcation of a fixed point ``x*`` with critical eigenvalue ``λ_c``, right and left
eigenvectors ``v``, ``w`` (``wᴴ v = 1``), a constant parameter perturbation ``δθ`` moves the
states along ``v`` by the linear response of the critical mode, driven by ``gᴴ δθ`` with the
**critical parameter direction** ``g = (∂f/∂θ)ᵀ w`` (one real vector for a real ``λ_c``, the
real pair ``Re g, Im g`` for a complex one). With ``Π`` the orthogonal projector onto
``span(g)`` in parameter space, the kernel splits exactly (no cross terms)::

    K = J Π Jᵀ + J (I − Π) Jᵀ = K_bif + K_res.

**Prediction from the normal form.** Linearising about ``x*`` with inputs held constant and
``h_0 = x*``, the critical coordinate ``c_t = wᴴ δh_t`` obeys ``c_{t+1} = m c_t + s gᴴ δθ``,
with ``m = 1 + dt λ_c``, ``s = dt`` for an Euler-integrated flow and ``m = λ_c``, ``s = 1`` for a
map. Hence ``c_t = s (1 − m^t)/(1 − m) · gᴴ δθ`` and, for one direction ``q = g/‖g‖``,

    λ(K_bif) ≈ B ‖v‖² ‖g‖² Σ_{t=1..T} |s (1 − m^t)/(1 − m)|²,

which for long trials tends to ``B T s² ‖v‖² ‖g‖² / |1 − m|²``. It diverges only when
``m → 1``: at a fold (``1 − m ∝ |μ − μ_c|^{1/2}``, channel ``∝ |μ − μ_c|^{-1}``) and at a
branch point (``1 − m ∝ |μ − μ_c|``, channel ``∝ |μ − μ_c|^{-2}``), each times how ``‖g‖²``
behaves along the branch (Kuznetsov ch. 3). At Hopf, Neimark–Sacker and flip points
``|1 − m|`` stays finite and the static channel bounded; there the kernel collapses through
the *transient* channel along ``d = ∂λ_c/∂θ``, which grows like ``δ⁻³`` (``δ = 1 − |m|``)
for trials that start off the fixed point. The
documentation page "Channel scaling" derives both laws.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._results import Result
from .dynamics import eigenvalue_derivatives
from .dynamics._critical import bilinear, critical_vectors, is_complex, trilinear
from .models._base import RhsView
from .operators import JacobianProductOperator, ParamSpec, StateNTK, resolve_params
from .spectral import eigsh, trace

__all__ = [
    "ChannelComparison",
    "ChannelNTK",
    "ChannelReport",
    "CriticalDirection",
    "channel_report",
    "compare_channels",
    "critical_direction",
    "fit_power_law",
    "predicted_channel_eigenvalue",
    "predicted_transient_eigenvalue",
    "real_mode_coefficients",
    "split_kernel",
]


@dataclasses.dataclass(frozen=True)
class CriticalDirection(Result):
    """Critical mode of a fixed point and its parameter direction.

    Attributes
    ----------
    g : Tensor ``[P, r]``
        ``(∂f/∂θ)ᵀ w`` (``r = 1``) or its real and imaginary parts (``r = 2``), rows in the
        order of ``param_names``.
    eigenvalue : complex
        The critical eigenvalue ``λ_c`` of ``∂f/∂x`` (flow) or multiplier (map).
    v, w : Tensor ``[n]`` (complex)
        Right and left eigenvectors, ``‖v‖ = 1``, ``wᴴ v = 1``.
    dt : float
        The model's Euler step (flows; 1 for maps), used by :func:`predicted_channel_eigenvalue`.
    d : Tensor ``[P, r]``
        How a parameter step moves the critical eigenvalue (real part, and the imaginary part
        for a complex mode): ``dλ_c/dθ`` along the branch of fixed points
        (``derivative="total"``, the default) or ``∂λ_c/∂θ = wᴴ (∂A/∂θ) v`` at fixed ``x``.
    d_partial : Tensor ``[P, r]``
        ``∂λ_c/∂θ`` at fixed ``x`` (equal to ``d`` when ``derivative="partial"``).
    derivative : str
        ``"total"`` or ``"partial"``: which one ``d`` is.
    """

    g: torch.Tensor
    d: torch.Tensor
    eigenvalue: complex
    v: torch.Tensor
    w: torch.Tensor
    x: torch.Tensor
    kind: str
    param_names: tuple[str, ...]
    dt: float = 1.0
    d_partial: torch.Tensor | None = None
    derivative: str = "total"

    @property
    def is_real(self) -> bool:
        """A real critical mode (fold, branch point, flip): one column in ``g`` and ``d``."""
        return self.g.shape[1] == 1


@dataclasses.dataclass(frozen=True)
class ChannelReport(Result):
    """Size of the bifurcation channel in the sNTK (see :func:`channel_report`)."""

    rank: int
    lambda_max: float
    lambda_bif: float
    lambda_res: float
    amplification: float
    trace: float
    trace_bif: float
    trace_share: float
    alignment: float
    predicted_lambda_bif: float | None
    num_matvecs: int


def critical_direction(
    model,
    x: torch.Tensor,
    u: torch.Tensor | None = None,
    *,
    params=None,
    eigenvalue: complex | None = None,
    derivative: str = "total",
) -> CriticalDirection:
    """The critical mode at a fixed point ``x`` of ``model.rhs(·, u)``, ``g = (∂f/∂θ)ᵀ w`` and
    the eigenvalue's parameter gradient ``d``.

    ``eigenvalue=None`` picks the nearest critical mode: the largest real part for a flow, the
    largest modulus for a map; otherwise the eigenvalue closest to the one given. Complex
    eigenvalues give the real pairs ``[Re g, Im g]`` and ``[∂ Re λ_c, ∂ Im λ_c]``. The parameter
    order is that of :class:`~lanczos_ntk.StateNTK` for the same ``params``.

    ``derivative="total"`` (default): ``d = dλ_c/dθ`` along the branch of fixed points, the
    coefficient by which a parameter step moves the critical eigenvalue when the state follows
    its fixed point (the unfolding parameter of the normal form); ``"partial"``: ``∂λ_c/∂θ`` at
    fixed ``x``. They coincide where ``∂A/∂x`` does not move ``λ_c`` (e.g. at the origin of an
    odd network) and differ elsewhere (upper pitchfork branch: partial 1, total -2). Both are in
    the result (``d_partial``). See :func:`lanczos_ntk.dynamics.eigenvalue_derivatives`.
    """
    if derivative not in ("total", "partial"):
        raise ValueError(f"expected derivative 'total' or 'partial', got {derivative!r}")

    kind = getattr(model, "kind", None)
    if kind not in ("flow", "map") or not callable(getattr(model, "rhs", None)):
        raise TypeError(
            f"expected a model with kind 'flow' or 'map' and rhs(h, u), got {type(model).__name__}"
        )
    p = {k: t.detach() for k, t in resolve_params(model, params).items()}
    spec = ParamSpec(tuple(p), tuple(t.shape for t in p.values()))
    x = torch.as_tensor(x, dtype=next(iter(p.values())).dtype).reshape(-1)
    if x.shape[0] != model.state_size:
        raise ValueError(f"expected a fixed point of size {model.state_size}, got {tuple(x.shape)}")
    if u is None:
        u = torch.zeros(model.input_size, dtype=x.dtype)
    u = torch.as_tensor(u, dtype=x.dtype).reshape(-1)

    def f(q, xx):
        return _rhs_with(model, q, xx, u)

    A = torch.func.jacrev(lambda xx: f(p, xx))(x).detach()
    lam = torch.linalg.eigvals(A)
    if eigenvalue is None:
        score = lam.real if kind == "flow" else lam.abs()
        i = int(torch.argmax(score + 1e-12 * lam.imag.clamp_min(0)))
    else:
        i = int(torch.argmin((lam - complex(eigenvalue)).abs()))
    real = not bool(is_complex(lam[i : i + 1])[0])
    lam_c = complex(lam[i].real, 0.0) if real else complex(lam[i])
    # the dynamics' normalisation: ‖v‖ = 1, largest entry real and positive, wᴴ v = 1
    v, w = critical_vectors(A, lam_c, real)
    v, w = v.to(torch.complex128), w.to(torch.complex128)
    pull = torch.func.vjp(lambda q: f(q, x), p)[1]
    cols = [w.real] if real else [w.real, w.imag]
    g = torch.stack([spec.flatten(pull(c.to(x.dtype))[0]) for c in cols], dim=1).detach()
    partial, total = eigenvalue_derivatives(lambda xx, q: f(q, xx), x, p, v, w, kind)

    def columns(sens):  # [P, r]: ∂ Re λ_c / ∂θ (and ∂ Im λ_c / ∂θ for a complex mode)
        parts = (torch.real, torch.imag)[: len(cols)]
        return torch.stack(
            [spec.flatten({n: part(t).to(x.dtype) for n, t in sens.items()}) for part in parts], dim=1
        )

    d_partial = columns(partial)
    if derivative == "partial":
        d = d_partial
    elif total is None:
        raise ValueError(
            "dλ_c/dθ along the branch does not exist at this point: A - cI is singular (a fold "
            "or a transcritical branch point, where the branch turns or crosses another); pass "
            "derivative='partial' for ∂λ_c/∂θ at fixed x"
        )
    else:
        d = columns(total)
    return CriticalDirection(
        g=g,
        d=d,
        d_partial=d_partial,
        derivative=derivative,
        eigenvalue=lam_c,
        v=v,
        w=w,
        x=x.detach().clone(),
        kind=kind,
        param_names=spec.names,
        dt=float(getattr(model, "dt", 1.0)),
    )


def _rhs_with(model, q, x, u):

    return torch.func.functional_call(RhsView(model), {"m." + k: t for k, t in q.items()}, (x, u))


class ChannelNTK(JacobianProductOperator):
    """``K_bif = J Π Jᵀ`` (``part="bif"``) or ``K_res = J (I − Π) Jᵀ`` (``part="res"``).

    ``Π = Q Qᵀ`` with ``Q`` an orthonormal basis of the critical parameter direction(s).
    Built with :func:`split_kernel`; shares the engine (and its cache) of the full kernel.
    """

    def __init__(self, anchor, *, _engine, basis: torch.Tensor, part: str = "bif"):
        if part not in ("bif", "res"):
            raise ValueError(f"expected part 'bif' or 'res', got {part!r}")
        super().__init__(anchor, _engine=_engine, basis=basis, part=part)
        self.basis, self.part = basis, part

    @property
    def _count(self) -> int:
        return self.engine.num_ntk_vectors

    def _project(self, Y: torch.Tensor) -> torch.Tensor:
        proj = self.basis @ (self.basis.T @ Y)
        return proj if self.part == "bif" else Y - proj

    def _apply(self, X):
        self.engine.num_ntk_vectors += X.shape[1]
        return self.engine.jvp(self._project(self.engine.vjp(X)))


def split_kernel(K: StateNTK, g: torch.Tensor) -> tuple[ChannelNTK, ChannelNTK]:
    """``(K_bif, K_res)`` with ``K_bif + K_res = K`` exactly, for directions ``g [P]`` or ``[P, r]``."""
    if not isinstance(K, StateNTK):
        raise TypeError(f"expected a lanczos_ntk.StateNTK, got {type(K).__name__}")
    g = torch.as_tensor(g)
    G = g[:, None] if g.dim() == 1 else g
    P = K.engine.P
    if G.dim() != 2 or G.shape[0] != P:
        raise ValueError(f"expected parameter directions of shape [{P}] or [{P}, r], got {tuple(g.shape)}")
    G = G.to(dtype=K.engine.dtype, device=K.engine.device)
    U, S, _ = torch.linalg.svd(G, full_matrices=False)
    if not bool(S.max() > 0):
        raise ValueError(
            "the critical parameter direction is zero: the parameters do not move "
            "the critical mode (e.g. a symmetric branch point with zero input)"
        )
    Q = U[:, S > 1e-12 * S.max()]  # an orthonormal basis of span(g), whatever its columns
    anchor = torch.empty(0, dtype=K.engine.dtype, device=K.engine.device)
    return (
        ChannelNTK(anchor, _engine=K.engine, basis=Q, part="bif"),
        ChannelNTK(anchor, _engine=K.engine, basis=Q, part="res"),
    )


def predicted_channel_eigenvalue(
    direction: CriticalDirection, *, trials: int, steps: int, dt: float | None = None
) -> float:
    """Linear-response prediction of ``λ_max(K_bif)`` (module docstring), states at ``x*``.

    Uses the top eigenvalue of the ``r × r`` Gram of the predicted columns
    ``J q_j ≈ v ⊗ c_t (wᴴ … )``; exact to first order when trials start at the fixed point
    under constant inputs and the non-critical modes are strongly damped.
    """
    kick = torch.zeros(trials, dtype=torch.complex128)
    return _top(_response_columns(direction, kick, steps, _basis(direction.g), dt, transient=False))


def _basis(D: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the span of the columns of ``D`` (float64)."""
    U, S, _ = torch.linalg.svd(D.to(torch.float64), full_matrices=False)
    return U[:, S > 1e-12 * S.max()] if S.numel() and float(S.max()) > 0 else U[:, :0]


def _top(cols: torch.Tensor) -> float:
    """``λ_max`` of the Gram of predicted columns ``[..., r]``."""
    if cols.shape[-1] == 0:
        return 0.0
    Jq = cols.reshape(-1, cols.shape[-1])
    return float(torch.linalg.eigvalsh(Jq.T @ Jq).max())


def _response_columns(
    direction: CriticalDirection,
    kick: torch.Tensor,
    steps: int,
    Q: torch.Tensor,
    dt: float | None = None,
    *,
    static: bool = True,
    transient: bool = True,
) -> torch.Tensor:
    """Predicted ``J q`` ``[B, T, n, r]`` for the orthonormal parameter directions ``Q``.

    The critical coordinate's first-order response to a constant step ``q``, for trials
    starting at ``c_0 = a_b``: ``δc_t = s (1 - m^t)/(1 - m) · wᴴ(∂f/∂θ)q`` (static: the fixed
    point moves) ``+ a_b t m^{t-1} s (dλ_c/dθ) q`` (transient: the relaxation rate changes),
    laid out along ``v`` (``2 Re(v ·)`` for a complex mode).
    """
    m, s = _multiplier(direction, dt)
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    mt = torch.tensor(m, dtype=torch.complex128) ** t
    g, d = direction.g.to(torch.float64), direction.d.to(torch.float64)
    real = direction.is_real
    a = torch.as_tensor(kick).to(torch.complex128).reshape(-1)  # [B]
    resp = torch.zeros(a.numel(), steps, Q.shape[1], dtype=torch.complex128)
    if static:
        gain = s * (1 - mt) / (1 - m) if abs(1 - m) > 1e-300 else s * t.to(torch.complex128)
        drive = (g[:, 0] @ Q).to(torch.complex128) if real else (g[:, 0] @ Q) - 1j * (g[:, 1] @ Q)
        resp = resp + gain[None, :, None] * drive[None, None, :]
    if transient:
        dm = (d[:, 0] @ Q).to(torch.complex128) if real else (d[:, 0] @ Q) + 1j * (d[:, 1] @ Q)
        rate = (
            s * t.to(torch.complex128) * mt / torch.tensor(m, dtype=torch.complex128)
            if abs(m) > 0
            else torch.zeros_like(mt)
        )
        resp = resp + a[:, None, None] * rate[None, :, None] * dm[None, None, :]
    v = direction.v.to(torch.complex128)
    cols = resp[:, :, None, :] * v[None, None, :, None]
    return cols.real if real else 2 * cols.real


def channel_report(
    K: StateNTK,
    g: torch.Tensor,
    *,
    tol: float = 1e-8,
    generator=None,
    prediction: float | None = None,
    trace_method: str = "exact",
    _whole: tuple | None = None,
) -> ChannelReport:
    """Amplification ``λ_max(K_bif)/λ_max(K_res)``, trace share and alignment of the channel.

    ``λ_max(K_bif)`` and ``tr K_bif = ‖J Q‖²_F`` are exact from ``r`` JVPs; ``λ_max(K)`` and
    ``λ_max(K_res)`` come from :func:`lanczos_ntk.eigsh` on the smaller side; ``tr K`` is exact
    (``P`` JVPs) unless ``trace_method`` names an estimator of :func:`lanczos_ntk.trace`
    (``"hutch++"`` is cheaper for large ``P``). The alignment is ``‖Q_Jᵀ u₁‖`` with ``u₁`` the top eigenvector
    of ``K`` and ``Q_J`` an orthonormal basis of ``J g``: 1 when ``u₁ ∈ span(J g)``.
    """
    K_bif, K_res = split_kernel(K, g)
    engine = K.engine
    start = engine.num_jvp_vectors + engine.num_vjp_vectors
    JQ = engine.jvp(K_bif.basis)  # [M, r] (this rank's rows)
    small = _summed(engine, JQ.T @ JQ)  # (J Q)ᵀ(J Q) over all rows
    lam_bif = float(torch.linalg.eigvalsh(small).max())
    tr_bif = float(small.trace())
    lam_max, u1, tr = _whole or _whole_kernel(K, tol, generator, trace_method)
    # ‖projection of u₁ on span(J Q)‖² = cᵀ small⁺ c with c = (J Q)ᵀ u₁
    c = _summed(engine, JQ.T @ u1)
    w, V = torch.linalg.eigh(small)
    keep = w > 1e-12 * w.max().clamp_min(1e-300)
    coef = V[:, keep].T @ c
    alignment = float(((coef**2) / w[keep]).sum().clamp(min=0.0).sqrt().clamp(max=1.0))
    res = (
        eigsh(_Dual(K_res), k=1, tol=tol, generator=generator)
        if engine.P < engine.total_M or engine.group is not None
        else eigsh(K_res, k=1, tol=tol, generator=generator)
    )
    lam_res = float(res.eigenvalues[0])
    used = engine.num_jvp_vectors + engine.num_vjp_vectors - start
    return ChannelReport(
        rank=int(K_bif.basis.shape[1]),
        lambda_max=lam_max,
        lambda_bif=lam_bif,
        lambda_res=lam_res,
        amplification=lam_bif / lam_res if lam_res > 0 else math.inf,
        trace=tr,
        trace_bif=tr_bif,
        trace_share=tr_bif / tr if tr > 0 else 0.0,
        alignment=alignment,
        predicted_lambda_bif=prediction,
        num_matvecs=int(used),
    )


def _whole_kernel(K: StateNTK, tol: float, generator, trace_method: str) -> tuple[float, torch.Tensor, float]:
    """What every channel report of one kernel shares: ``λ_max(K)``, the top eigenvector ``u₁``
    of ``K`` (unit, ``[M]``) and ``tr K``.
    """
    engine = K.engine
    dual = engine.P < engine.total_M or engine.group is not None
    top = eigsh(K.dual() if dual else K, k=1, tol=tol, return_eigenvectors=True, generator=generator)
    assert top.eigenvectors is not None  # return_eigenvectors=True
    vec = top.eigenvectors[:, :1].to(engine.dtype)
    u1 = (engine.jvp(vec) if dual else vec)[:, 0]  # K's eigenvector is J x / ‖J x‖
    u1 = u1 / _summed(engine, (u1 * u1).sum()).sqrt().clamp_min(1e-300)
    tr = (
        _exact_trace(engine)
        if trace_method == "exact"
        else float(trace(K, method=trace_method, generator=generator).estimate)
    )
    return float(top.eigenvalues[0]), u1, tr


class _Dual:
    """``(I − Π) G (I − Π)``: the dual of ``K_res`` (same nonzero spectrum), as a matmul."""

    def __init__(self, K_res: ChannelNTK):
        self.K_res = K_res
        P = K_res.engine.P
        self.shape = torch.Size([P, P])
        self.dtype = K_res.engine.dtype

    def matmul(self, X):
        e, Q = self.K_res.engine, self.K_res.basis
        Y = X - Q @ (Q.T @ X)
        Y = e.vjp(e.jvp(Y))
        return Y - Q @ (Q.T @ Y)


def _exact_trace(engine, block: int = 256) -> float:
    """``tr K = tr G = ‖J‖²_F`` from ``P`` JVPs in blocks (cheap when ``P`` is small)."""
    total = 0.0
    P = engine.P
    for s in range(0, P, block):
        E = torch.zeros(P, min(block, P - s), dtype=engine.dtype, device=engine.device)
        E[s : s + E.shape[1]] = torch.eye(E.shape[1], dtype=engine.dtype, device=engine.device)
        total += float(_summed(engine, (engine.jvp(E) ** 2).sum()))
    return total


def _summed(engine, t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the engine's process group (itself without one)."""
    if engine.group is not None:
        t = t.clone()
        torch.distributed.all_reduce(t, group=engine.group)
    return t


def fit_power_law(distance, value) -> tuple[float, float]:
    """Least-squares exponent ``a`` of ``value ≈ C · distance^a`` and its standard error."""
    d = torch.as_tensor(distance, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
    if d.shape != y.shape or d.numel() < 3:
        raise ValueError(f"expected at least three matching points, got {d.numel()} and {y.numel()}")
    if bool((d <= 0).any()) or bool((y <= 0).any()):
        raise ValueError("expected positive distances and values for a log-log fit")
    X = torch.stack([torch.log(d), torch.ones_like(d)], dim=1)
    coef, *_ = torch.linalg.lstsq(X, torch.log(y)[:, None])
    resid = torch.log(y) - (X @ coef)[:, 0]
    dof = max(1, d.numel() - 2)
    cov = (resid @ resid / dof) * torch.linalg.inv(X.T @ X)
    return float(coef[0, 0]), float(cov[0, 0].sqrt())


# ---------------------------------------------------------------------- the two channels
def _multiplier(direction: CriticalDirection, dt: float | None = None) -> tuple[complex, float]:
    """``(m, s)``: the critical multiplier per step and the drive scale (``dt`` or 1)."""
    lam = direction.eigenvalue
    dt = direction.dt if dt is None else float(dt)
    return (1 + dt * lam, dt) if direction.kind == "flow" else (lam, 1.0)


def kicks(direction: CriticalDirection, h0: torch.Tensor) -> torch.Tensor:
    """Critical coordinates ``a_b = wᴴ (h0_b - x*)`` of the trials' initial states ``[B, n]``."""
    dev = torch.as_tensor(h0, dtype=torch.float64) - direction.x.to(torch.float64)
    return dev.to(torch.complex128) @ direction.w.to(torch.complex128).conj()


def predicted_transient_eigenvalue(
    direction: CriticalDirection, kick: torch.Tensor, *, steps: int, dt: float | None = None
) -> float:
    r"""Linear-response prediction of ``λ_max(J Π_d Jᵀ)``: the transient channel along ``d``.

    Trials that start off the fixed point with critical coordinate ``a_b`` relax as
    ``c_t = a_b m^t``; a parameter step ``q`` changes the multiplier by ``s dᵀq`` (``d`` the
    total derivative of the critical eigenvalue, ``s = dt`` for an Euler flow), so
    ``∂c_t/∂q = a_b t m^{t-1} s dᵀq`` and the states move along ``v`` (``2 Re(v ·)`` for a
    complex mode). Summed over trials and ``t ≤ T``:

    .. math:: λ_d ≈ s² ‖d‖² ‖v‖² Σ_b |a_b|² Σ_{t≤T} t² |m|^{2(t-1)}
              \;\to\; s² ‖d‖² Σ_b |a_b|² \,/\, (4 δ³), \qquad δ = 1 - |m|,

    the ``δ⁻³`` law, for ``T δ ≫ 1`` (the transient has died out within the trial) and kicks
    in the linear regime (see :class:`ChannelComparison`). ``kick``: ``[B]`` (complex for a
    complex mode), e.g. from :func:`kicks`.
    """
    return _top(_response_columns(direction, kick, steps, _basis(direction.d), dt, static=False))


@dataclasses.dataclass(frozen=True)
class ChannelComparison(Result):
    """The static channel ``g``, the transient channel ``d`` and their joint span, measured and
    predicted (:func:`compare_channels`).

    Attributes
    ----------
    g, d, joint : ChannelReport or None
        :func:`channel_report` along ``span(g)``, ``span(d)`` and ``span(g, d)`` (rank ≤ 4);
        ``None`` where the direction is zero (e.g. ``g = 0`` at a symmetric branch point with
        no input).
    predicted_g, predicted_d, predicted_joint : float
        First-order linear response (static and transient terms together, with the trials'
        kicks; :func:`_response_columns`) restricted to each span: what ``λ_bif`` should be.
    static_law, transient_law : float
        The two terms alone: :func:`predicted_channel_eigenvalue` along ``g`` (trials at
        ``x*``, ``→ B T s² ‖g‖² / |1 - m|²``) and :func:`predicted_transient_eigenvalue` along
        ``d`` (``→ s² ‖d‖² Σ_b |a_b|² / (4δ³)``).
    multiplier : complex
        ``m`` (``1 + dt λ_c`` for an Euler flow).
    delta : float
        ``1 - |m|``: distance to the bifurcation per step.
    saturation : float
        ``T δ``: the transient law holds for ``T δ ≫ 1`` (a shorter trial cuts the sum at ``T``).
    kick : float
        ``max_b |a_b|``, the largest critical coordinate of the initial states.
    nonlinearity : float
        ``s (q₂ |a| + q₃ |a|²) / δ`` with ``q₂ = |wᴴ D²f[v, v]|/2``, ``q₃ = |wᴴ D³f[v, v, v]|/6``
        (their ``v̄`` forms for a complex mode): the size of the normal form's nonlinear terms
        against the linear decay over the kick. The predictions assume it ``≪ 1``
        (``a ≪ δ`` for a quadratic form, ``a ≪ √δ`` for a cubic one).
    dominant : str
        ``"g"`` or ``"d"``: the channel with the larger measured ``λ_bif``; ``"none"`` if both
        are zero.
    ratio : float
        ``λ_bif(d) / λ_bif(g)`` measured (``inf`` when ``g = 0``).
    conditions : dict[str, bool]
        ``stable`` (``δ > 0``: the simulated map relaxes to ``x*``; an Euler-simulated flow can
        fail this while ``Re λ_c < 0``), ``linear`` (nonlinearity ≤ 0.1; the predictions'
        relative error is about the nonlinearity) and ``saturated`` (``T δ ≥ 10``, where the
        transient law's ``δ⁻³`` holds; below it the finite-``T`` sums still apply).
    """

    g: ChannelReport | None
    d: ChannelReport | None
    joint: ChannelReport | None
    predicted_g: float
    predicted_d: float
    predicted_joint: float
    static_law: float
    transient_law: float
    multiplier: complex
    delta: float
    saturation: float
    kick: float
    nonlinearity: float
    dominant: str
    ratio: float
    conditions: dict

    def summary(self) -> str:
        """One paragraph: which channel dominates, by how much, and under which conditions."""

        def fmt(r):
            return "zero" if r is None else f"{r.lambda_bif:.4g}"

        cond = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in self.conditions.items())
        return (
            f"static channel g: λ_bif {fmt(self.g)} (predicted {self.predicted_g:.4g}); "
            f"transient channel d: λ_bif {fmt(self.d)} (predicted {self.predicted_d:.4g}); "
            f"the {self.dominant} channel dominates (λ_d/λ_g = {self.ratio:.3g}); "
            f"δ = 1 - |m| = {self.delta:.3g}, T δ = {self.saturation:.3g}, kick "
            f"{self.kick:.3g}, nonlinearity {self.nonlinearity:.3g} ({cond})"
        )


def real_mode_coefficients(model, direction: CriticalDirection, u: torch.Tensor) -> tuple[float, float]:
    """``(a₂, k₃) = (½ wᵀ D²f[v,v], ⅙ wᵀ D³f[v,v,v])``: the quadratic and cubic coefficients of
    a real critical mode's normal form ``c ↦ c + s(μ c + a₂ c² + k₃ c³)`` at ``direction.x``
    under the constant input ``u``.
    """
    x = direction.x.to(torch.float64)
    p = {k: t.detach() for k, t in model.named_parameters()}
    v, w = direction.v.real.to(x.dtype), direction.w.real.to(x.dtype)

    def f(xx):
        return _rhs_with(model, p, xx, u)

    return float(w @ bilinear(f, x, v, v)) / 2, float(w @ trilinear(f, x, v, v, v)) / 6


def _nonlinearity(
    model, direction: CriticalDirection, u: torch.Tensor, kick: float, delta: float, s: float
) -> float:

    if direction.is_real:
        q2, q3 = (abs(c) for c in real_mode_coefficients(model, direction, u))
    else:
        x = direction.x.to(torch.float64)
        p = {k: t.detach() for k, t in model.named_parameters()}
        v, w = direction.v.to(torch.complex128), direction.w.to(torch.complex128)

        def f(xx):
            return _rhs_with(model, p, xx, u)

        def dot(a):
            return complex(w.conj() @ a.to(torch.complex128))

        q2 = abs(dot(bilinear(f, x, v, v))) / 2 + abs(dot(bilinear(f, x, v, v.conj())))
        q3 = abs(dot(trilinear(f, x, v, v, v.conj()))) / 2
    return s * (q2 * kick + q3 * kick**2) / delta if delta > 0 else math.inf


def compare_channels(
    K: StateNTK,
    direction: CriticalDirection,
    *,
    u: torch.Tensor | None = None,
    tol: float = 1e-8,
    generator=None,
    trace_method: str = "exact",
) -> ChannelComparison:
    """Measure and predict both bifurcation channels of ``K`` at a critical mode.

    Near a bifurcation a parameter step reaches the states in two ways: it shifts the fixed point
    (the **static** channel ``g = (∂f/∂θ)ᵀ w``, amplified by ``1/|1 - m|``: folds and branch
    points) and it changes how fast the critical mode relaxes (the **transient** channel
    ``d = dλ_c/dθ``, amplified like ``δ⁻³`` for trials that start off the fixed point: the
    unfolding direction of the normal form, and how Hopf, flip and Neimark–Sacker points
    collapse the kernel when it wins). Which one dominates depends on the trials:
    ``a² ‖d‖² / δ³`` against ``T ‖g‖² / |1 - m|²``. This reports both, their joint span, the
    two predictions and the conditions they need.

    ``direction`` from :func:`critical_direction` at the fixed point ``x*`` the trials relax to
    (``derivative="total"``); ``u`` the constant input it was computed at (zeros by default);
    the kicks ``a_b`` are read from ``K``'s initial states (the model's default when ``K`` has
    no ``h0``). The three reports share one ``λ_max(K)``, top eigenvector and ``tr K`` (their
    ``num_matvecs`` leave that work out).
    """
    if not isinstance(K, StateNTK):
        raise TypeError(f"expected a lanczos_ntk.StateNTK, got {type(K).__name__}")
    engine = K.engine
    model = engine.snapshot_model()
    B, T = engine.batch, engine.steps
    if engine.h0 is not None:
        h0 = engine.h0
    else:
        h0 = (
            # duck-typed (hasattr); nn.Module.__getattr__ types the attribute Tensor | Module
            model.initial_state(B, dtype=torch.float64)  # type: ignore[operator]
            if hasattr(model, "initial_state")
            else torch.zeros(B, direction.x.numel(), dtype=torch.float64)
        )
    a = kicks(direction, h0)
    if engine.group is not None:  # every rank's trials: the predictions count all of them
        parts: list = [None] * torch.distributed.get_world_size(engine.group)
        torch.distributed.all_gather_object(parts, a.cpu(), group=engine.group)
        a = torch.cat(parts).to(a.device)
        B = a.shape[0]
    m, s = _multiplier(direction)
    delta = 1.0 - abs(m)
    uu = (
        torch.zeros(getattr(model, "input_size", 0), dtype=torch.float64)
        if u is None
        else torch.as_tensor(u, dtype=torch.float64).reshape(-1)
    )
    kick = float(a.abs().max())

    whole = _whole_kernel(K, tol, generator, trace_method)  # shared by the three reports

    def report(D):
        if float(D.abs().max()) == 0.0:
            return None
        return channel_report(K, D, tol=tol, generator=generator, trace_method=trace_method, _whole=whole)

    g_rep, d_rep = report(direction.g), report(direction.d)
    joint = report(torch.cat([direction.g, direction.d], dim=1))
    lam_g = g_rep.lambda_bif if g_rep is not None else 0.0
    lam_d = d_rep.lambda_bif if d_rep is not None else 0.0
    nonlin = _nonlinearity(model, direction, uu, kick, delta, s)

    def predicted(D):
        return _top(_response_columns(direction, a, T, _basis(D)))

    return ChannelComparison(
        g=g_rep,
        d=d_rep,
        joint=joint,
        predicted_g=predicted(direction.g),
        predicted_d=predicted(direction.d),
        predicted_joint=predicted(torch.cat([direction.g, direction.d], dim=1)),
        static_law=predicted_channel_eigenvalue(direction, trials=B, steps=T),
        transient_law=predicted_transient_eigenvalue(direction, a, steps=T),
        multiplier=complex(m),
        delta=float(delta),
        saturation=float(T * delta),
        kick=kick,
        nonlinearity=float(nonlin),
        dominant="none" if lam_g == lam_d == 0.0 else ("d" if lam_d > lam_g else "g"),
        ratio=lam_d / lam_g if lam_g > 0 else math.inf,
        conditions={
            "stable": bool(delta > 0),
            "linear": bool(nonlin <= 0.1),
            "saturated": bool(T * delta >= 10),
        },
    )
