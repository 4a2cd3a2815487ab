"""Pure products with the state Jacobian ``J = ∂ vec(outputs) / ∂θ``, chunked over trials.

The operators in :mod:`lanczos_ntk._operator` are thin shells over :class:`JacobianEngine`:
``jvp`` (``J x``), ``vjp`` (``Jᵀ v``), ``ntk`` (``J Jᵀ v``) and ``gram`` (``Jᵀ J x``), each on a
block of ``k`` vectors at once. Only one chunk of trials is on the device at a time; ``J`` is
never formed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ._functional import ModelFunction, ParamSpec, resolve_params
from .models._base import StateSpaceModel, check_inputs

__all__ = ["JacobianEngine", "DEFAULT_CHUNK_ELEMENTS"]

#: Default chunk: as many trials as keep one chunk's outputs under this many elements.
DEFAULT_CHUNK_ELEMENTS = 1 << 20

_JVP_MODES = ("auto", "forward", "double_vjp", "structured")


class JacobianEngine:
    """Matrix-free products with the Jacobian of a model's outputs with respect to its parameters.

    See :class:`lanczos_ntk.StateNTK` for the meaning of the arguments.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, *, h0=None,
                 outputs: str | Callable = "states", params: Sequence[str] | None = None,
                 chunk_size: int | None = None, jvp: str = "auto", cache: bool | None = None,
                 process_group=None):
        self.group = process_group
        if process_group is not None and not torch.distributed.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first")
        self.fn = ModelFunction(model, outputs)
        # a snapshot: the operator stays the kernel at these parameters even if the model
        # is trained on afterwards (everything not differentiated is a constant of it)
        self.params = {n: t.clone() for n, t in resolve_params(model, params).items()}
        self.constants = {n: t.detach().clone() for n, t in
                          [*model.named_parameters(), *model.named_buffers()]
                          if n not in self.params}
        self.spec = ParamSpec(tuple(self.params), tuple(p.shape for p in self.params.values()))
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        check_inputs(inputs, getattr(model, "input_size", None)
                     if isinstance(model, (StateSpaceModel, nn.RNN, nn.GRU, nn.LSTM)) else None)
        self.inputs = inputs
        self.h0 = h0
        self.batch, self.steps = int(inputs.shape[0]), int(inputs.shape[1])
        self._h0_dim = 1 if isinstance(model, (nn.RNN, nn.GRU, nn.LSTM)) else 0
        if h0 is not None:
            self._check_h0(h0)
        if jvp not in _JVP_MODES:
            raise ValueError(f"expected jvp to be one of {_JVP_MODES}, got {jvp!r}")
        self.width = self._probe_outputs(model)
        if chunk_size is None:
            chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, self.steps * self.width))
        if int(chunk_size) < 1:
            raise ValueError(f"expected chunk_size >= 1 (trials per chunk), got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.chunks = [slice(s, min(s + self.chunk_size, self.batch))
                       for s in range(0, self.batch, self.chunk_size)]
        self.jvp_mode = self._choose_jvp(jvp)
        # a structured linearisation is three M-sized arrays: keep every chunk's; an autograd
        # graph is a whole forward's activations: keep it only when there is a single chunk
        if cache is None:
            cache = len(self.chunks) == 1 or self.jvp_mode == "structured"
        self.cache = bool(cache)
        self._lin: dict[int, object] = {}
        self.num_vjp_vectors = 0
        self.num_jvp_vectors = 0
        self.num_ntk_vectors = 0
        self.num_gram_vectors = 0

    # -- sizes ---------------------------------------------------------------------------------
    @property
    def M(self) -> int:
        return self.batch * self.steps * self.width

    @property
    def P(self) -> int:
        return self.spec.numel

    def call(self, params: dict[str, torch.Tensor], u, h0) -> torch.Tensor:
        """Outputs at ``params`` (differentiated) and the snapshot of everything else."""
        return self.fn({**self.constants, **params}, u, h0)

    # -- inputs --------------------------------------------------------------------------------
    def _check_h0(self, h0) -> None:
        tensors = h0 if isinstance(h0, tuple) else (h0,)
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.dim() <= self._h0_dim \
                    or t.shape[self._h0_dim] != self.batch:
                raise ValueError(f"expected h0 with the trial dimension (dim {self._h0_dim}) of size "
                                 f"{self.batch}, got {getattr(t, 'shape', type(t).__name__)}")

    def chunk_inputs(self, sl: slice):
        u = self.inputs[sl].to(device=self.device, dtype=self.dtype)
        h0 = self.h0
        if h0 is not None:
            def take(t):
                idx = (slice(None),) * self._h0_dim + (sl,)
                return t[idx].to(device=self.device, dtype=self.dtype)
            h0 = tuple(take(t) for t in h0) if isinstance(h0, tuple) else take(h0)
        return u, h0

    def _probe_outputs(self, model) -> int:
        width = None
        step = max(1, DEFAULT_CHUNK_ELEMENTS // max(1, self.steps * 64))
        with torch.no_grad():
            for s in range(0, self.batch, step):
                sl = slice(s, min(s + step, self.batch))
                u, h0 = self.chunk_inputs(sl)
                out = self.call(self.params, u, h0)
                if not isinstance(out, torch.Tensor) or out.dim() != 3 \
                        or out.shape[:2] != u.shape[:2]:
                    raise ValueError(f"expected {type(model).__name__} outputs of shape "
                                     f"[{u.shape[0]}, {self.steps}, c], got "
                                     f"{getattr(out, 'shape', type(out).__name__)}")
                bad = ~torch.isfinite(out)
                if bad.any():
                    trial_time = bad.any(-1).nonzero()
                    first = trial_time[torch.argmin(trial_time[:, 1] * self.batch + trial_time[:, 0])]
                    raise ValueError(f"non-finite states: first at trial {int(first[0]) + s}, "
                                     f"time step {int(first[1])}; the dynamics diverge for these "
                                     "inputs (lower the gain, the step dt or the input scale)")
                width = out.shape[-1]
        return int(width)

    def _choose_jvp(self, jvp: str) -> str:
        structured = getattr(self.fn.model, "_structured_jacobian", None)
        if jvp == "structured" and (structured is None or structured(self) is None):
            raise ValueError(f"jvp='structured' needs a model with a structured Jacobian "
                             f"(CTRNN, DiscreteRNN, not subclassed); got {type(self.fn.model).__name__}")
        if jvp == "structured" and self.fn.outputs != "states":
            raise ValueError("jvp='structured' covers outputs='states' only; use jvp='auto' "
                             "for readouts and callables")
        if jvp != "auto":
            return jvp
        if structured is not None and self.fn.outputs == "states" and structured(self) is not None:
            return "structured"
        u, h0 = self.chunk_inputs(slice(0, 1))
        u = u[:, : min(2, self.steps)]
        try:
            tangents = {k: torch.zeros_like(v) for k, v in self.params.items()}
            torch.func.jvp(lambda p: self.call(p, u, h0), (self.params,), (tangents,))
        except (RuntimeError, NotImplementedError):
            return "double_vjp"
        return "forward"

    # -- per chunk -----------------------------------------------------------------------------
    def _graph(self, i: int):
        """Forward graph of chunk ``i`` for reverse-mode products (cached if enabled)."""
        if i in self._lin:
            return self._lin[i]
        u, h0 = self.chunk_inputs(self.chunks[i])
        p = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}
        with torch.enable_grad():
            out = self.call(p, u, h0)
        graph = {"p": p, "out": out, "u": u, "h0": h0}
        if self.cache:
            self._lin[i] = graph
        return graph

    def _structured(self, i: int):
        if i in self._lin:
            return self._lin[i]
        u, h0 = self.chunk_inputs(self.chunks[i])
        lin = self.fn.model._structured_jacobian(self).linearize({**self.constants, **self.params},
                                                                  u, h0)
        if self.cache:
            self._lin[i] = lin
        return lin

    def vjp_chunk(self, i: int, V: torch.Tensor) -> torch.Tensor:
        """``J_iᵀ V`` for ``V [k, b, T, c]``; returns ``[k, P]``."""
        if self.jvp_mode == "structured":
            return self._structured(i).vjp(V)
        g = self._graph(i)
        p = g["p"]
        with torch.enable_grad():  # all k cotangents share one (vmapped) reverse pass
            grads = torch.autograd.grad(g["out"], list(p.values()), V, retain_graph=True,
                                        is_grads_batched=True, allow_unused=True)
        k = V.shape[0]
        full = {n: (gr.reshape(k, *p[n].shape) if gr is not None else
                    torch.zeros(k, *p[n].shape, dtype=self.dtype, device=self.device))
                for n, gr in zip(p, grads)}
        return self.spec.flatten(full, batch_dims=1)

    def jvp_chunk(self, i: int, X: torch.Tensor) -> torch.Tensor:
        """``J_i X`` for ``X [k, P]``; returns ``[k, b, T, c]``."""
        if self.jvp_mode == "structured":
            return self._structured(i).jvp(X)
        tangents = self.spec.unflatten(X)
        if self.jvp_mode == "forward":
            u, h0 = self.chunk_inputs(self.chunks[i])

            def one(t):
                return torch.func.jvp(lambda p: self.call(p, u, h0), (self.params,), (t,))[1]

            if X.shape[0] == 1:
                return one({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
            return torch.func.vmap(one)(tangents)
        g = self._graph(i)
        with torch.enable_grad():
            if "dual" not in g:
                v0 = torch.zeros_like(g["out"], requires_grad=True)
                names = list(g["p"])
                grads = torch.autograd.grad(g["out"], [g["p"][n] for n in names], v0,
                                            create_graph=True, allow_unused=True)
                keep = [j for j, gr in enumerate(grads) if gr is not None and gr.requires_grad]
                g["dual"] = (v0, [grads[j] for j in keep], [names[j] for j in keep])
            v0, grads, names = g["dual"]
            cols = []
            for j in range(X.shape[0]):
                if not grads:
                    cols.append(torch.zeros_like(g["out"]))
                    continue
                (col,) = torch.autograd.grad(grads, v0, [tangents[n][j] for n in names],
                                             retain_graph=True, allow_unused=True)
                cols.append(torch.zeros_like(g["out"]) if col is None else col)
        if not self.cache:
            g.pop("dual", None)
        return torch.stack(cols)

    # -- whole operator ------------------------------------------------------------------------
    def _split(self, V: torch.Tensor, i: int) -> torch.Tensor:
        sl = self.chunks[i]
        n_per = self.steps * self.width
        block = V[sl.start * n_per: sl.stop * n_per]
        return block.T.reshape(V.shape[1], sl.stop - sl.start, self.steps, self.width)

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``Jᵀ V`` for ``V [M, k]``; returns ``[P, k]`` (one pass over the chunks)."""
        out = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        for i in range(len(self.chunks)):
            out += self.vjp_chunk(i, self._split(V, i))
        self.num_vjp_vectors += V.shape[1]
        return self._reduce(out).T

    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``J X`` for ``X [P, k]``; returns ``[M, k]`` (one pass over the chunks)."""
        Xt = X.T.contiguous()
        parts = [self.jvp_chunk(i, Xt).reshape(X.shape[1], -1) for i in range(len(self.chunks))]
        self.num_jvp_vectors += X.shape[1]
        return torch.cat(parts, dim=1).T

    def ntk(self, V: torch.Tensor) -> torch.Tensor:
        """``J Jᵀ V``: a reverse pass, then a forward pass over the chunks."""
        return self.jvp(self.vjp(V))

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        """``Jᵀ J X``: one pass over the chunks (each chunk's ``J_iᵀ J_i X`` accumulates)."""
        Xt = X.T.contiguous()
        out = torch.zeros_like(Xt)
        for i in range(len(self.chunks)):
            out += self.vjp_chunk(i, self.jvp_chunk(i, Xt))
        self.num_jvp_vectors += X.shape[1]
        self.num_vjp_vectors += X.shape[1]
        return self._reduce(out).T

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Sum a ``P``-sized result over the ranks of the process group (data parallelism)."""
        if self.group is not None:
            torch.distributed.all_reduce(out, group=self.group)
        return out
