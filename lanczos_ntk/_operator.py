"""The state-space NTK ``K = J Jᵀ`` and its parameter-space dual ``G = Jᵀ J`` as operators."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from linear_operator import LinearOperator
from torch import nn

from ._engine import JacobianEngine

__all__ = ["StateNTK", "DualNTK"]


class _JacobianProductOperator(LinearOperator):
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
        n = self.shape[-1]
        vector = rhs.dim() == 1
        X = rhs.unsqueeze(-1) if vector else rhs
        if X.dim() != 2 or X.shape[0] != n:
            raise ValueError(f"expected a vector [{n}] or a block [{n}, k], got {tuple(rhs.shape)}")
        out = self._apply(X.to(device=self.engine.device, dtype=self.engine.dtype))
        out = out.to(dtype=rhs.dtype, device=rhs.device) if rhs.is_floating_point() else out
        return out.squeeze(-1) if vector else out

    def _t_matmul(self, rhs: torch.Tensor) -> torch.Tensor:
        return self._matmul(rhs)

    def _diagonal(self) -> torch.Tensor:
        raise NotImplementedError("the diagonal of the sNTK is not available matrix-free; "
                                  "use lanczos_ntk.testing.dense_ntk on small problems")

    @property
    def is_symmetric(self) -> bool:
        return True

    def type(self, dtype: torch.dtype):
        """Change of dtype is the model's: this operator computes in the model's dtype."""
        if dtype != self.engine.dtype:
            raise TypeError(f"this operator computes in the model's dtype {self.engine.dtype}; "
                            f"convert the model (e.g. model.to({dtype})) and build a new one")
        return self

    def to(self, *args, **kwargs):
        """Only no-op conversions are allowed (see :meth:`type`)."""
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.dtype) and a != self.engine.dtype:
                return self.type(a)
            if isinstance(a, (torch.device, str)) and torch.device(a) != torch.device(
                    self.engine.device):
                raise TypeError(f"this operator lives on the model's device {self.engine.device}; "
                                "move the model and build a new operator")
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
            out = self._matmul(torch.as_tensor(x.reshape(n, -1), dtype=self.engine.dtype,
                                               device=self.engine.device))
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
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, M={e.M}, P={e.P}, "
                f"chunks={len(e.chunks)}, path={e.plan.path!r}, jvp={e.jvp_mode!r}, "
                f"dtype={e.dtype})")


class StateNTK(_JacobianProductOperator):
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
    jvp : {"auto", "structured", "cell", "forward", "double_vjp"}
        How ``J x`` is computed. ``"structured"``: the closed-form linear recurrences of the
        CTRNN and DiscreteRNN (DESIGN §1). ``"cell"``: the model's one-step cell linearised
        along the cached trajectory (built-in models, batch-first ``torch.nn.RNN`` / ``GRU`` /
        ``LSTM`` through their cell equations, and modules with a ``step(h, u)`` method whose
        ``forward`` iterates it). ``"forward"``: forward-mode AD through the whole forward;
        ``"double_vjp"``: the VJP of a VJP on the cached autograd graph (for kernels without
        forward mode). ``"auto"`` takes the first that applies, in that order; the cell and
        closed-form paths cover ``outputs="states"``.
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

    def __init__(self, model: nn.Module | torch.Tensor, inputs: torch.Tensor | None = None, *,
                 h0=None, outputs: str | Callable = "states", params: Sequence[str] | None = None,
                 chunk_size: int | None = None, jvp: str = "auto", cache: bool | None = None,
                 memory_budget: int | None = None, process_group=None,
                 _engine: JacobianEngine | None = None):
        if _engine is None:
            if inputs is None:
                raise TypeError("StateNTK(model, inputs): inputs [B, T, d_in] are required")
            _engine = JacobianEngine(model, inputs, h0=h0, outputs=outputs, params=params,
                                     chunk_size=chunk_size, jvp=jvp, cache=cache,
                                     memory_budget=memory_budget, process_group=process_group)
        anchor = torch.empty(0, dtype=_engine.dtype, device=_engine.device)
        super().__init__(anchor, _engine=_engine)

    @property
    def _count(self) -> int:
        return self.engine.num_ntk_vectors

    def _apply(self, X):
        self.engine.num_ntk_vectors += X.shape[1]
        return self.engine.ntk(X)

    def dual(self) -> DualNTK:
        """The ``(P, P)`` parameter-space Gram ``G = Jᵀ J`` over the same engine."""
        return DualNTK(torch.empty(0, dtype=self.engine.dtype, device=self.engine.device),
                       _engine=self.engine)


class DualNTK(_JacobianProductOperator):
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
