r"""Low-rank natural gradient: SGD preconditioned by the top eigenpairs of ``G = Jᵀ J``.

Near a bifurcation a few directions of the parameter Gram ``G = Jᵀ J`` (the dual of the
sNTK) are amplified by orders of magnitude, and a learning rate that suits the bulk makes
training spike or stall along them. With the top-``k`` eigenpairs ``(U, Λ)`` of ``G``
(computed matrix-free by Lanczos, warm-started from the previous refresh) the update is

.. math::
    δθ = -η\,λ_0 (U Λ Uᵀ + λ_0 I)^{-1} ∇L
       = -η \big[(I - U Uᵀ)∇L + U \operatorname{diag}\big(λ_0/(Λ + λ_0)\big) Uᵀ ∇L\big],

plain SGD outside the top-``k`` subspace and steps shrunk exactly along the amplified
directions. ``λ_0`` is the damping scale; by default the bulk level ``λ_{k+1}`` (the largest
eigenvalue *not* in the preconditioner), so directions at the bulk level keep about half
their step and a channel ``A`` times the bulk is slowed by about ``1/A``.

**Refreshes.** The first refresh is a thick-restart Lanczos solve. Later ones (``refresh=
"track"``, the default) take one subspace-iteration step from the previous basis: one block
product ``Y = G V`` with ``V`` orthonormal (``rank + oversample`` columns), Rayleigh–Ritz on
``Vᵀ Y``, and ``V ← orth(Y S)`` for the next time. The parameters move little between
refreshes, so the dominant subspace is tracked at the cost of ``rank + oversample`` products;
when a tracked Ritz pair's residual ``‖G u − θ u‖`` exceeds ``track_tol · θ₁`` the refresh
falls back to a warm-started Lanczos solve. ``refresh="lanczos"`` always solves.
"""

from __future__ import annotations

import torch
from torch import nn

from .linalg import subspace_step
from .operators import StateNTK, resolve_params
from .spectral import eigsh

__all__ = ["LowRankNaturalGradient"]


class LowRankNaturalGradient(torch.optim.Optimizer):
    """SGD with a low-rank natural-gradient preconditioner from the sNTK's dual.

    Parameters
    ----------
    model : nn.Module
        The model being trained; its trainable parameters (or ``params`` by name) are updated.
    inputs : Tensor ``[B, T, d_in]``
        The inputs on which ``J`` (hence ``G``) is evaluated; replace them with
        :meth:`set_inputs` (e.g. per mini-batch).
    lr : float
        Learning rate ``η``.
    rank : int
        ``k``, the number of preconditioned directions.
    damping : float, optional
        ``λ_0``; default the ``(k+1)``-th eigenvalue of ``G`` at each refresh.
    refresh_every : int
        Steps between eigenpair refreshes (the first step always refreshes).
    outputs, params, h0, chunk_size : as for :class:`lanczos_ntk.StateNTK`
    tol : float
        Relative tolerance of the Lanczos eigensolver (a preconditioner needs little).
    generator : torch.Generator, optional
        Randomness of the Lanczos start block.
    refresh : {"track", "lanczos"}
        How eigenpairs are refreshed after the first solve (module docstring).
    oversample : int
        Extra tracked directions beyond ``rank + 1`` (``refresh="track"``).
    track_tol : float
        Relative Ritz residual above which a tracked refresh falls back to Lanczos.
    process_group : torch.distributed.ProcessGroup, optional
        Data parallelism: each rank passes its own trials as ``inputs``; ``G`` is the global
        Gram (as in :class:`lanczos_ntk.StateNTK`), so every rank computes the same
        eigenpairs, and the gradients are summed over the ranks before the step
        (``reduce_gradients``), so that every rank takes the same step. Each rank's loss is
        then its share of a loss summed over trials; with a per-rank mean, scale by
        ``1 / world_size``.
    reduce_gradients : bool
        With ``process_group``: all-reduce (sum) the gradients in :meth:`step`. Pass ``False``
        when something else already did (e.g. ``DistributedDataParallel``, which averages).

    Notes
    -----
    Cost per refresh: one eigensolve on ``G`` (a few dozen ``G`` products, shared in blocks);
    per step: two ``P × k`` products. Counters ``num_refreshes`` and ``num_matvecs`` say what
    was spent.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        *,
        lr: float,
        rank: int = 4,
        damping: float | None = None,
        refresh_every: int = 10,
        outputs="states",
        params=None,
        h0=None,
        chunk_size=None,
        tol: float = 1e-3,
        generator: torch.Generator | None = None,
        refresh: str = "track",
        oversample: int = 2,
        track_tol: float = 0.1,
        process_group=None,
        reduce_gradients: bool = True,
    ):

        if lr <= 0:
            raise ValueError(f"expected a positive learning rate, got {lr}")
        if int(rank) < 1:
            raise ValueError(f"expected rank >= 1, got {rank}")
        if int(refresh_every) < 1:
            raise ValueError(f"expected refresh_every >= 1, got {refresh_every}")
        if refresh not in ("track", "lanczos"):
            raise ValueError(f"expected refresh 'track' or 'lanczos', got {refresh!r}")
        if int(oversample) < 0 or not track_tol > 0:
            raise ValueError(f"expected oversample >= 0 and track_tol > 0, got {oversample}, {track_tol}")
        if damping is not None and damping <= 0:
            raise ValueError(f"expected a positive damping, got {damping}")
        names = list(resolve_params(model, params))
        named = dict(model.named_parameters())
        super().__init__([named[n] for n in names], {"lr": float(lr)})
        self.model, self.names = model, names
        self.rank, self.damping = int(rank), damping
        self.refresh_every, self.tol = int(refresh_every), float(tol)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.refresh_mode, self.oversample, self.track_tol = refresh, int(oversample), track_tol
        self._V: torch.Tensor | None = None
        self.num_solves = 0
        self._kw = {
            "outputs": outputs,
            "params": names,
            "h0": h0,
            "chunk_size": chunk_size,
            "process_group": process_group,
        }
        self.process_group, self.reduce_gradients = process_group, bool(reduce_gradients)
        self.inputs = inputs
        self.U: torch.Tensor | None = None
        self.eigenvalues: torch.Tensor | None = None
        self.lambda0: float | None = None
        self.num_refreshes = 0
        self.num_matvecs = 0
        self._steps = 0

    def set_inputs(self, inputs: torch.Tensor, h0=None) -> None:
        """Evaluate ``G`` on new inputs from the next refresh on."""
        self.inputs = inputs
        self._kw["h0"] = h0

    def refresh(self) -> None:
        """Recompute the top eigenpairs of ``G``: tracked, or a warm-started Lanczos solve."""
        G = StateNTK(self.model, self.inputs, **self._kw).dual()
        if self.refresh_mode == "lanczos" or self._V is None or not self._track(G):
            self._solve(G)
        self.num_refreshes += 1

    def _set(self, vals: torch.Tensor, vecs: torch.Tensor, dtype) -> None:
        kk = min(self.rank, vals.numel())
        self.U = vecs[:, :kk].to(dtype)
        self.eigenvalues = vals[:kk].to(torch.float64)
        if self.damping is not None:
            self.lambda0 = float(self.damping)
        else:
            bulk = float(vals[kk]) if vals.numel() > kk else float(vals[-1])
            self.lambda0 = max(bulk, 1e-12 * float(vals[0]), 1e-300)

    def _solve(self, G) -> None:

        k = min(self.rank + 1, G.shape[0])
        res = eigsh(
            G, k=k, which="LA", tol=self.tol, return_eigenvectors=True, v0=self.U, generator=self.generator
        )
        vecs = res.eigenvectors
        assert vecs is not None  # return_eigenvectors=True
        self._set(res.eigenvalues.to(torch.float64), vecs, G.dtype)
        self.num_matvecs += int(res.num_matvecs)
        self.num_solves += 1
        width = min(self.rank + 1 + self.oversample, G.shape[0])
        V = vecs.to(G.dtype)
        if V.shape[1] < width:
            extra = torch.randn(V.shape[0], width - V.shape[1], dtype=G.dtype, generator=self.generator)
            V = torch.cat([V, extra.to(V.device)], dim=1)
        self._V = torch.linalg.qr(V).Q

    def _track(self, G) -> bool:
        """One subspace-iteration step from the tracked basis; ``False`` if it is not accurate."""
        V = self._V
        assert V is not None  # refresh() tracks only after a first solve
        step = subspace_step(G.matmul, V)
        self.num_matvecs += V.shape[1]
        theta = step.eigenvalues
        k = min(self.rank, theta.numel())
        if not bool((step.residuals[:k] <= self.track_tol * theta[0].abs()).all()):
            self.U = step.eigenvectors[:, :k]  # best available warm start for the solve
            return False
        self._set(theta.to(torch.float64), step.eigenvectors, G.dtype)
        self._V = step.basis
        return True

    def precondition(self, grad: torch.Tensor) -> torch.Tensor:
        """``λ₀ (U Λ Uᵀ + λ₀ I)^{-1} grad`` for a flat gradient ``[P]``."""
        if self.U is None:
            raise RuntimeError("no eigenpairs yet: call refresh() or step() first")
        # set together with U by the first solve
        assert self.eigenvalues is not None and self.lambda0 is not None
        U = self.U.to(grad.dtype)
        coef = U.T @ grad
        shrink = (self.lambda0 / (self.eigenvalues + self.lambda0)).to(grad.dtype)
        return grad - U @ coef + U @ (shrink * coef)

    @torch.no_grad()
    def step(self, closure=None):
        """One preconditioned step; gradients must be in ``.grad`` (or use ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._steps % self.refresh_every == 0:
            self.refresh()
        self._steps += 1
        group = self.param_groups[0]
        ps = group["params"]
        grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
        if self.process_group is not None and self.reduce_gradients:
            torch.distributed.all_reduce(grad, group=self.process_group)
        update = self.precondition(grad)
        offset = 0
        for p in ps:
            n = p.numel()
            p.add_(update[offset : offset + n].view_as(p), alpha=-group["lr"])
            offset += n
        return loss
