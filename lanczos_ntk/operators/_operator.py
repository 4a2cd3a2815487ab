"""The state-space NTK ``K = J Jᵀ`` and its parameter-space dual ``G = Jᵀ J`` as operators."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import numpy as np
import torch
from linear_operator import LinearOperator
from torch import nn

from ._engine import JacobianEngine

__all__ = ["DualNTK", "NTKPlusNoise", "StateNTK"]


class JacobianProductOperator(LinearOperator):
    """Symmetric PSD operator over a :class:`JacobianEngine`; subclasses choose the side."""

    _side = "primal"

    def __init__(self, anchor: torch.Tensor, *, _engine: JacobianEngine, **kwargs):
        super().__init__(anchor, _engine=_engine, **kwargs)
        self.engine = _engine

    # -- LinearOperator protocol ------------------------------------------------------------
    def _size(self) -> torch.Size:
        n = self.engine.M if self._side == "primal" else self.engine.P
        return torch.Size([n, n])

    def _transpose_nonbatch(self):
        return self

    def _apply(self, X: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        """``A rhs`` for a vector ``[n]`` or blocks ``[..., n, k]``: batch dimensions are folded
        into one block of columns, so every column shares the same passes over the data.
        """
        n = self.shape[-1]
        vector = rhs.dim() == 1
        X = rhs.unsqueeze(-1) if vector else rhs
        if X.dim() < 2 or X.shape[-2] != n:
            raise ValueError(f"expected a vector [{n}] or a block [..., {n}, k], got {tuple(rhs.shape)}")
        batch, k = X.shape[:-2], X.shape[-1]
        flat = X.movedim(-2, 0).reshape(n, -1)
        out = self._apply(flat.to(device=self.engine.device, dtype=self.engine.dtype))
        out = out.reshape(n, *batch, k).movedim(0, -2)
        out = out.to(dtype=rhs.dtype, device=rhs.device) if rhs.is_floating_point() else out
        out = _touch(self._args[0], out)  # zero gradient to the placeholder, not a failure
        return out.squeeze(-1) if vector else out

    def _t_matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> torch.Tensor:
        """Matrix-free diagonal from ``P`` forward products ``J e_p`` in blocks:
        ``diag(K)_m = Σ_p (J e_p)_m²`` (row norms of ``J``), ``diag(G)_p = ||J e_p||²``.
        """
        e = self.engine
        out = torch.zeros(self.shape[-1], dtype=e.dtype, device=e.device)
        block = max(1, min(e.P, 64))
        for s in range(0, e.P, block):
            w = min(block, e.P - s)
            E = torch.zeros(e.P, w, dtype=e.dtype, device=e.device)
            E[s : s + w] = torch.eye(w, dtype=e.dtype, device=e.device)
            JE = e.jvp(E)
            if self._side == "primal":
                out += (JE * JE).sum(dim=1)
            else:
                out[s : s + w] = (JE * JE).sum(dim=0)
        return out

    def _bilinear_derivative(self, left_vecs: torch.Tensor, right_vecs: torch.Tensor):
        """Derivative of ``uᵀ A v`` with respect to the operator's tensor argument: zero, since
        that argument is a placeholder (``requires_grad_`` on the operator is allowed, as
        linear_operator's functions expect, and gives zero gradients). The kernel's dependence
        on the model's parameters is not differentiated: it is a fixed kernel at the
        parameters it was built at. Gradients with respect to right-hand sides are exact.
        """
        return tuple(torch.zeros_like(a) if a.requires_grad else None for a in self.representation())

    def add_diagonal(self, diag: torch.Tensor):
        """``A + diag``. A constant ``σ² > 0`` on a parameter count ``P <= 4096`` gives
        :class:`NTKPlusNoise`, whose solves and log-determinants are exact through the
        ``P × P`` Gram (Woodbury); anything else is linear_operator's ``AddedDiagLinearOperator``.
        """
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        if diag.numel() == 1 and self.engine.P <= DENSE_GRAM_MAX and self.engine.group is None:
            return NTKPlusNoise(self, diag.reshape(()))
        return super().add_diagonal(diag)

    def __add__(self, other):
        """``A + σ² I`` given as linear_operator's constant diagonal (how GPyTorch's
        ``GaussianLikelihood`` adds its noise) becomes :class:`NTKPlusNoise` too.
        """
        from linear_operator.operators import ConstantDiagLinearOperator

        if isinstance(other, ConstantDiagLinearOperator) and other.shape == self.shape:
            return self.add_diagonal(other.diag_values.reshape(-1)[0])
        return super().__add__(other)

    def _expand_batch(self, batch_shape):
        return _BatchView(self, torch.Size(batch_shape))

    def _unsqueeze_batch(self, dim: int):
        return _BatchView(self, torch.Size([1]))

    @property
    def is_symmetric(self) -> bool:
        return True

    def _get_indices(self, row_index, col_index, *batch_indices) -> torch.Tensor:
        """Entries ``A[row_index, col_index]`` (broadcast tensor indices): one product per
        distinct column asked for.
        """
        rows, cols = torch.broadcast_tensors(torch.as_tensor(row_index), torch.as_tensor(col_index))
        wanted, where = torch.unique(cols.reshape(-1), return_inverse=True)
        n, e = self.shape[-1], self.engine
        E = torch.zeros(n, wanted.numel(), dtype=e.dtype, device=e.device)
        E[wanted.to(e.device), torch.arange(wanted.numel(), device=e.device)] = 1.0
        AE = self._matmul(E)
        vals = AE[rows.reshape(-1).to(e.device), where.to(e.device)]
        return vals.reshape(rows.shape)

    def type(self, dtype: torch.dtype):
        """The same operator computing in ``dtype`` (float32 or float64): a new engine over a
        copy of the model at this operator's parameters, converted to ``dtype``.
        """
        if dtype == self.engine.dtype:
            return self
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"this operator computes in float32 or float64 only, got {dtype}; "
                "half precision cannot resolve the spectrum of the sNTK"
            )
        return self._over(self.engine.rebuilt(dtype))

    def _over(self, engine: JacobianEngine):
        return type(self)(torch.empty(0, dtype=engine.dtype, device=engine.device), _engine=engine)

    def to(self, *args, **kwargs):
        """Only no-op conversions are allowed (see :meth:`type`)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.dtype) and a != self.engine.dtype:
                return self.type(a)
            if isinstance(a, (torch.device, str)) and torch.device(a) != torch.device(self.engine.device):
                raise TypeError(
                    f"this operator lives on the model's device {self.engine.device}; "
                    "move the model and build a new operator"
                )
        return self

    # -- conveniences -----------------------------------------------------------------------
    @property
    def num_matvecs(self) -> int:
        """Number of vectors this operator (the primal or the dual side) has been applied to."""
        return self._count

    def mv(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a vector ``[n]`` or a block ``[n, k]`` (all ``k`` columns share the passes)."""
        return self._matmul(x)

    def jvp(self, x: torch.Tensor) -> torch.Tensor:
        """``J x``: parameter tangent ``[P]`` (or ``[P, k]``) to output tangent ``[M]`` (``[M, k]``)."""
        return self._lift(self.engine.jvp, x, self.engine.P)

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        """``Jᵀ v``: output cotangent ``[M]`` (or ``[M, k]``) to parameter gradient ``[P]``."""
        return self._lift(self.engine.vjp, v, self.engine.M)

    def _lift(self, f, x, n):
        vector = x.dim() == 1
        X = x.unsqueeze(-1) if vector else x
        if X.dim() != 2 or X.shape[0] != n:
            raise ValueError(f"expected a vector [{n}] or a block [{n}, k], got {tuple(x.shape)}")
        out = f(X.to(device=self.engine.device, dtype=self.engine.dtype))
        return out.squeeze(-1) if vector else out

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out) over this operator."""
        from scipy.sparse.linalg import LinearOperator as ScipyOperator

        n = self.shape[-1]

        def mm(x):
            x = np.asarray(x)
            out = self._matmul(
                torch.as_tensor(x.reshape(n, -1), dtype=self.engine.dtype, device=self.engine.device)
            )
            return out.detach().cpu().numpy().astype(np.float64).reshape(x.shape[0], *x.shape[1:])

        return ScipyOperator(shape=(n, n), matvec=mm, matmat=mm, rmatvec=mm, dtype=np.float64)

    @property
    def distributed(self) -> bool:
        """Whether products are summed over a process group (see :class:`StateNTK`)."""
        return self.engine.group is not None

    @property
    def plan(self):
        """The :class:`~lanczos_ntk.ProductPlan`: path, chunks, cached bytes, block size, budget."""
        return self.engine.plan

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the parameters, in the order of the flat parameter vector."""
        return self.engine.spec.names

    def __repr__(self) -> str:
        e = self.engine
        return (
            f"{type(self).__name__}(shape={tuple(self.shape)}, M={e.M}, P={e.P}, "
            f"chunks={len(e.chunks)}, path={e.plan.path!r}, jvp={e.jvp_mode!r}, "
            f"dtype={e.dtype})"
        )


DENSE_GRAM_MAX = 4096  # parameters up to which G is formed (P products, 8 P² bytes) for solves


class NTKPlusNoise(LinearOperator):
    r"""``A + σ² I`` for the sNTK ``A = K = J Jᵀ`` or its dual ``G = Jᵀ J``, a Gaussian-process
    covariance with exact solves and log-determinants.

    With the ``P × P`` Gram ``G`` formed once (``P`` products, cached on the engine) and
    ``C = G + σ² I = L Lᵀ``:

    * ``(K + σ² I)⁻¹ b = (b − J C⁻¹ Jᵀ b) / σ²`` (Woodbury), ``(G + σ² I)⁻¹ b = C⁻¹ b``;
    * ``log det(K + σ² I) = (M − P) log σ² + log det C``, ``log det(G + σ² I) = log det C``,

    all differentiable in ``b`` and ``σ²``. Products are the operator's plus ``σ² x``. Obtain it
    with ``K.add_diagonal(torch.tensor(σ²))`` (``P <= 4096``); GPyTorch's
    ``MultivariateNormal`` then gets exact ``log_prob`` (linear_operator's default would be CG
    with a loose tolerance and a stochastic log-determinant).
    """

    def __init__(self, base, noise: torch.Tensor):
        super().__init__(base, noise)
        self.base, self.noise = base, noise

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self):
        return self

    @property
    def is_symmetric(self) -> bool:
        return True

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self.base._matmul(rhs) + self.noise * rhs

    def _t_matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> torch.Tensor:
        return self.base._diagonal() + self.noise

    def _bilinear_derivative(self, left_vecs, right_vecs):
        base = self.base._bilinear_derivative(left_vecs, right_vecs)
        dnoise = (left_vecs * right_vecs).sum() if self.noise.requires_grad else None
        return (*base, dnoise)

    def _factor(self) -> torch.Tensor:
        e = self.base.engine
        G = e.dense_gram().to(self.noise.dtype)
        return torch.linalg.cholesky(G + self.noise * torch.eye(e.P, dtype=G.dtype, device=G.device))

    def solve(self, right_tensor: torch.Tensor, left_tensor: torch.Tensor | None = None):
        """``(A + σ² I)⁻¹ right_tensor`` (times ``left_tensor`` on the left if given), exact."""
        X = self._solve_with(self._factor(), right_tensor)
        return X if left_tensor is None else left_tensor @ X

    def _solve_with(self, L: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        vector = rhs.dim() == 1
        B = (rhs.unsqueeze(-1) if vector else rhs).to(L.dtype)
        if self.base._side == "dual":
            X = torch.cholesky_solve(B, L)
        else:
            e = self.base.engine
            X = (B - _linear(e, "jvp", torch.cholesky_solve(_linear(e, "vjp", B), L))) / self.noise
        X = X.to(rhs.dtype)
        return X.squeeze(-1) if vector else X

    def _solve(self, rhs, preconditioner=None, num_tridiag=0):
        if num_tridiag:
            return super()._solve(rhs, preconditioner, num_tridiag)
        return self.solve(rhs)

    def inv_quad_logdet(self, inv_quad_rhs=None, logdet=False, reduce_inv_quad=True):
        """``(bᵀ (A + σ² I)⁻¹ b, log det(A + σ² I))``, both exact (see the class)."""
        L = self._factor()  # once for both parts
        inv_quad = torch.zeros((), dtype=self.dtype, device=self.device)
        if inv_quad_rhs is not None:
            terms = (inv_quad_rhs * self._solve_with(L, inv_quad_rhs)).sum(dim=-2)
            inv_quad = terms.sum(-1) if reduce_inv_quad else terms
        ld = torch.zeros((), dtype=self.dtype, device=self.device)
        if logdet:
            ld = 2.0 * torch.log(torch.diagonal(L)).sum()
            extra = self.shape[-1] - self.base.engine.P
            if extra > 0:
                ld = ld + extra * torch.log(self.noise)
        return _touch(self.base._args[0], inv_quad, ld)

    def _logdet(self):
        return self.inv_quad_logdet(logdet=True)[1]


class _Linear(torch.autograd.Function):
    """``f(X)`` for a linear map ``f`` with adjoint ``f_adj``, differentiable in ``X``."""

    @staticmethod
    def forward(ctx, f, f_adj, X):
        ctx.f_adj = f_adj
        return f(X.detach())

    @staticmethod
    def backward(ctx, grad):
        return None, None, ctx.f_adj(grad.detach())


def _linear(engine: JacobianEngine, name: str, X: torch.Tensor) -> torch.Tensor:
    """``J X`` (``name="jvp"``) or ``Jᵀ X`` (``"vjp"``) in ``X``'s dtype, with gradients to ``X``
    when it needs them (the two are each other's adjoint).
    """
    adjoint = {"jvp": "vjp", "vjp": "jvp"}[name]

    def cast(fn):
        return lambda Y: fn(Y.to(engine.dtype)).to(Y.dtype)

    f, f_adj = cast(getattr(engine, name)), cast(getattr(engine, adjoint))
    return _Linear.apply(f, f_adj, X) if X.requires_grad else f(X.detach())


def _touch(anchor: torch.Tensor, *outs: torch.Tensor):
    """Connect outputs to the placeholder argument with a zero gradient when it asks for one,
    so linear_operator's backward passes find a graph instead of failing.
    """
    if anchor.requires_grad and torch.is_grad_enabled():
        zero = 0.0 * anchor.sum()
        outs = tuple(o + zero for o in outs)
    return outs if len(outs) > 1 else outs[0]


class _BatchView(LinearOperator):
    """The same symmetric operator repeated over batch dimensions (``expand``, ``unsqueeze``):
    a batch of right-hand sides ``[*batch, n, k]`` goes through the base operator as one
    block, so the repetition costs no extra passes over the data.
    """

    def __init__(self, base: JacobianProductOperator, batch_shape: torch.Size):
        super().__init__(base, batch_shape=batch_shape)
        self.base = base
        self._batch = torch.Size(batch_shape)

    def _size(self) -> torch.Size:
        return self._batch + self.base.shape

    def _transpose_nonbatch(self):
        return self

    def _matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        X = rhs.unsqueeze(-1) if rhs.dim() == 1 else rhs
        shape = torch.broadcast_shapes(X.shape[:-2], self._batch) + X.shape[-2:]
        out = self.base._matmul(X.expand(shape))
        return out.squeeze(-1) if rhs.dim() == 1 else out

    def _t_matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> torch.Tensor:
        return self.base._diagonal().expand(*self._batch, self.base.shape[-1])

    def _expand_batch(self, batch_shape):
        return _BatchView(self.base, torch.Size(batch_shape))

    def _unsqueeze_batch(self, dim: int):
        batch = list(self._batch)
        batch.insert(dim, 1)
        return _BatchView(self.base, torch.Size(batch))

    def _get_indices(self, row_index, col_index, *batch_indices) -> torch.Tensor:
        vals = self.base._get_indices(row_index, col_index)
        shape = torch.broadcast_shapes(vals.shape, *(torch.as_tensor(b).shape for b in batch_indices))
        return vals.expand(shape)

    def _getitem(self, row_index, col_index, *batch_indices):
        full = slice(None, None, None)
        if row_index == full and col_index == full:
            batch = torch.empty(self._batch + (0,))[(*batch_indices, Ellipsis)].shape[:-1]
            return _BatchView(self.base, batch) if len(batch) else self.base
        return super()._getitem(row_index, col_index, *batch_indices)

    def _bilinear_derivative(self, left_vecs: torch.Tensor, right_vecs: torch.Tensor):
        return self.base._bilinear_derivative(left_vecs, right_vecs)

    @property
    def is_symmetric(self) -> bool:
        return True


class StateNTK(JacobianProductOperator):
    r"""The state-space neural tangent kernel ``K = J Jᵀ`` as an implicit ``(M, M)`` operator.

    ``J = ∂ vec(h) / ∂θ`` is the Jacobian of all outputs (trials × time × units, row-major
    ``(b, t, i)``) with respect to the trainable parameters. ``K v = J (Jᵀ v)`` costs one
    reverse and one forward pass over the data; a block ``[M, k]`` shares them.

    Parameters
    ----------
    model : nn.Module
        A :mod:`lanczos_ntk.models` model, any module with ``forward(u) -> [B, T, n]``, or a
        batch-first ``torch.nn.RNN`` / ``GRU`` / ``LSTM``.
    inputs : Tensor ``[B, T, d_in]``
        Floating-point inputs; they may stay on the CPU while the model is on a GPU: each
        chunk of trials is moved when it is used.
    h0 : Tensor, optional
        Initial states, ``[B, n]`` (``[layers, B, H]`` for torch RNNs, a tuple for LSTM).
    outputs : "states" (default), "readout", or callable ``states -> [B, T, c]``
    params : list of str, optional
        Parameter names to differentiate; ``None`` means all with ``requires_grad``.
    chunk_size : int, optional
        Trials per chunk. Default: as many as the memory budget allows (one chunk when the
        whole dataset fits). Only one chunk's work is in memory at a time.
    jvp : {"auto", "structured", "cell", "forward", "double_vjp", "linearize"}
        How ``J x`` is computed. ``"structured"``: the closed-form linear recurrences of the
        CTRNN and DiscreteRNN (DESIGN §1). ``"cell"``: the model's one-step cell linearised
        along the cached trajectory (built-in models, batch-first ``torch.nn.RNN`` / ``GRU`` /
        ``LSTM`` through their cell equations, modules with a ``step(h, u)`` method whose
        ``forward`` iterates it, and modules whose ``forward`` loops over one update, read off
        a symbolic trace of a few steps; see *Scale and memory* in the docs). ``"forward"``:
        forward-mode AD through the whole forward;
        ``"double_vjp"``: the VJP of a VJP on the cached autograd graph (also for kernels
        without forward mode); ``"linearize"``: ``torch.func.linearize`` of the whole forward,
        traced once per chunk and cached (the trace takes seconds; each product is then several
        times cheaper than the VJP of a VJP on large chunks). ``"auto"`` takes the structured,
        then the cell path; for other modules (cached) the VJP of a VJP, or ``"linearize"`` when
        the outputs number at least ``LINEARIZE_MIN_OUTPUTS`` (2²¹) and forward mode works;
        forward mode when the graphs do not fit the budget. The cell and closed-form paths cover
        ``outputs="states"``.
    memory_budget : int, optional
        Bytes the operator may hold: cached linearisations plus one chunk's transient work.
        Default: half the memory available on the model's device (``MemAvailable`` on the CPU,
        ``torch.cuda.mem_get_info`` on a GPU). Chunks are as large as it allows, and every
        chunk's linearisation is cached when they all fit, so no product re-runs the forward.
        A budget too small for one trial raises ``ValueError``. The outcome is :attr:`plan`.
    process_group : torch.distributed.ProcessGroup, optional
        Data parallelism (DESIGN §4): each rank passes its own trials; the ``P``-sized
        ``Jᵀ v`` is all-reduced, so ``K.dual()`` is the global ``G`` on every rank while ``K``
        acts on the rank's slice of the state vector (all ranks call together). Spectral
        functions therefore run on the dual side. ``gloo`` on CPU, ``nccl`` on GPUs.
    cache : bool, optional
        Keep every chunk's linearisation between products. Default: when they fit the budget.

    Examples
    --------
    >>> import torch, lanczos_ntk as lnk
    >>> model = lnk.models.CTRNN(4, 1, seed=0)
    >>> K = lnk.StateNTK(model, torch.ones(2, 3, 1, dtype=torch.float64))
    >>> K.shape, K.dual().shape
    (torch.Size([24, 24]), torch.Size([24, 24]))
    """

    _side = "primal"

    def __init__(
        self,
        model: nn.Module | torch.Tensor | None,
        inputs: torch.Tensor | None = None,
        *,
        h0=None,
        outputs: str | Callable = "states",
        params: Sequence[str] | None = None,
        chunk_size: int | None = None,
        jvp: str = "auto",
        cache: bool | None = None,
        memory_budget: int | None = None,
        process_group=None,
        _engine: JacobianEngine | None = None,
    ):
        if _engine is None:
            if inputs is None:
                raise TypeError("StateNTK(model, inputs): inputs [B, T, d_in] are required")
            _engine = JacobianEngine(
                cast(nn.Module, model),  # validated there (resolve_params refuses a non-module)
                inputs,
                h0=h0,
                outputs=outputs,
                params=params,
                chunk_size=chunk_size,
                jvp=jvp,
                cache=cache,
                memory_budget=memory_budget,
                process_group=process_group,
            )
        if isinstance(model, torch.Tensor) and model.numel() == 0:
            anchor = model  # rebuilt by linear_operator from its representation
        else:
            anchor = torch.empty(0, dtype=_engine.dtype, device=_engine.device)
        super().__init__(anchor, _engine=_engine)

    @property
    def _count(self) -> int:
        return self.engine.num_ntk_vectors

    def _over(self, engine: JacobianEngine) -> StateNTK:
        return StateNTK(None, _engine=engine)

    def _apply(self, X):
        self.engine.num_ntk_vectors += X.shape[1]
        return self.engine.ntk(X)

    def dual(self) -> DualNTK:
        """The ``(P, P)`` parameter-space Gram ``G = Jᵀ J`` over the same engine."""
        return DualNTK(
            torch.empty(0, dtype=self.engine.dtype, device=self.engine.device), _engine=self.engine
        )

    @property
    def total_states(self) -> int:
        """``M`` of the whole dataset: this operator's rows, summed over the ranks of its
        process group (equal to the local ``M`` without one). Results report it as their
        ``primal_dimension``.
        """
        return self.engine.total_M


class DualNTK(JacobianProductOperator):
    r"""The parameter-space Gram ``G = Jᵀ J`` (``P × P``): same nonzero spectrum as ``K``.

    An eigenvector ``x`` of ``G`` with eigenvalue ``λ > 0`` maps to the eigenvector
    ``J x / sqrt(λ)`` of ``K``. Obtain it with :meth:`StateNTK.dual`.
    """

    _side = "dual"

    @property
    def _count(self) -> int:
        return self.engine.num_gram_vectors

    def _apply(self, X):
        self.engine.num_gram_vectors += X.shape[1]
        return self.engine.gram(X)

    def primal(self) -> StateNTK:
        """The ``(M, M)`` state-space kernel over the same engine."""
        return StateNTK(None, _engine=self.engine)

    def dual(self) -> StateNTK:
        return self.primal()
