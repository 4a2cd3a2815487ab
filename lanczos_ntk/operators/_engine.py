"""Pure products with the state Jacobian ``J = ∂ vec(outputs) / ∂θ``, chunked over trials.

The operators in :mod:`lanczos_ntk.operators._operator` are thin shells over :class:`JacobianEngine`:
``jvp`` (``J x``), ``vjp`` (``Jᵀ v``), ``ntk`` (``J Jᵀ v``) and ``gram`` (``Jᵀ J x``), each on a
block of ``k`` vectors at once. Only one chunk of trials is on the device at a time; ``J`` is
never formed.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.autograd import forward_ad

from ..models._base import StateSpaceModel, check_finite, check_inputs
from ._budget import DEFAULT_BUDGET_FRACTION, ProductPlan, available_memory, saved_bytes
from ._cell_path import CellLinearization
from ._cells import Cell, find_cell
from ._closed_form import WeightActivityJacobian, closed_form
from ._dual_graph import DualGraph
from ._functional import ModelFunction, ParamSpec, resolve_params
from ._loop_cell import restoring_attributes
from ._scratch import Scratch

__all__ = [
    "CPU_WORKING_SET",
    "DOUBLE_VJP_WORKING_SET",
    "JacobianEngine",
    "LINEARIZE_MIN_OUTPUTS",
    "PROBE_ELEMENTS",
]

#: The no-grad probe of the outputs runs in pieces of about this many output elements.
PROBE_ELEMENTS = 1 << 20

#: Bytes of intermediates one pass of a block may touch on the CPU before it is split by trials.
CPU_WORKING_SET = 128 << 20
DOUBLE_VJP_WORKING_SET = 32 << 20  # outputs per batched double-backward pass on the CPU

#: Outputs per trial chunk from which ``auto`` linearises an opaque module with
#: ``torch.func.linearize``: its one-time trace (seconds) pays off once each ``J x`` is slow
#: (at n=128, T=100, B=256: 30 ms against 160 ms for the VJP of a VJP, trace 4.8 s).
LINEARIZE_MIN_OUTPUTS = 1 << 21

#: ``J x`` vectors in forward mode before ``auto`` traces such a module. The trace costs about as
#: much as 44 forward-mode products at that size (4.7 s against 108 ms), and the operator cannot
#: know how many products will follow: tracing once forward mode has cost about one trace keeps
#: any run within about twice the better of the two choices (the rent-or-buy rule). A top-10
#: solve (about 45 products) then never traces; SLQ (hundreds) traces early.
LINEARIZE_AFTER_VECTORS = 48

_JVP_MODES = ("auto", "structured", "cell", "forward", "double_vjp", "linearize")
_PATHS = {
    "structured": "closed_form",
    "cell": "cell",
    "forward": "autograd",
    "double_vjp": "autograd",
    "linearize": "autograd",
}


class JacobianEngine:
    """Matrix-free products with the Jacobian of a model's outputs with respect to its parameters.

    See :class:`lanczos_ntk.StateNTK` for the meaning of the arguments.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        *,
        h0=None,
        outputs: str | Callable = "states",
        params: Sequence[str] | None = None,
        chunk_size: int | None = None,
        jvp: str = "auto",
        cache: bool | None = None,
        memory_budget: int | None = None,
        process_group=None,
    ):
        self.group = process_group
        self.config = dict(
            h0=h0,
            outputs=outputs,
            params=params,
            chunk_size=chunk_size,
            jvp=jvp,
            cache=cache,
            memory_budget=memory_budget,
        )
        if process_group is not None and not torch.distributed.is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group first"
            )
        self.fn = ModelFunction(model, outputs)
        # a snapshot: the operator stays the kernel at these parameters even if the model
        # is trained on afterwards (everything not differentiated is a constant of it)
        self.params = {n: t.clone() for n, t in resolve_params(model, params).items()}
        self.constants = {
            n: t.detach().clone()
            for n, t in [*model.named_parameters(), *model.named_buffers()]
            if n not in self.params
        }
        self.spec = ParamSpec(tuple(self.params), tuple(p.shape for p in self.params.values()))
        self.full = {**self.constants, **self.params}  # everything the model reads, by name
        for name, t in self.full.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"the model's {name!r} has {int((~torch.isfinite(t)).sum())} "
                    f"non-finite entries (NaN or inf); the sNTK needs finite "
                    f"parameters and buffers"
                )
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.itemsize = first.element_size()
        if self.dtype not in (torch.float32, torch.float64):
            raise TypeError(
                f"expected a float32 or float64 model, got parameters of dtype "
                f"{self.dtype}; half precision cannot resolve the spectrum "
                "(convert with model.float() or model.double())"
            )
        check_inputs(
            inputs,
            getattr(model, "input_size", None)
            if isinstance(model, (StateSpaceModel, nn.RNN, nn.GRU, nn.LSTM))
            else None,
        )
        check_finite(inputs)
        self.inputs = inputs
        self.h0 = h0
        self.batch, self.steps = int(inputs.shape[0]), int(inputs.shape[1])
        self._h0_dim = 1 if isinstance(model, (nn.RNN, nn.GRU, nn.LSTM)) else 0
        if h0 is not None:
            self._check_h0(h0)
        if jvp not in _JVP_MODES:
            raise ValueError(f"expected jvp to be one of {_JVP_MODES}, got {jvp!r}")
        if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
        ):
            raise ValueError(
                f"expected chunk_size to be a whole number >= 1 (trials per chunk), got {chunk_size!r}"
            )
        if memory_budget is not None and (
            isinstance(memory_budget, bool)
            or not isinstance(memory_budget, (int, float))
            or not memory_budget > 0
        ):
            raise ValueError(f"expected memory_budget in bytes (a positive number), got {memory_budget!r}")
        self.width = self._probe_outputs(model)
        self._closed: WeightActivityJacobian | None = None
        self._cell: Cell | None = None
        self._forward_fallback = False
        self.jvp_mode = self._choose_jvp(jvp)
        budget = (
            int(memory_budget)
            if memory_budget is not None
            else int(DEFAULT_BUDGET_FRACTION * available_memory(self.device))
        )
        self.plan = self._make_plan(budget, chunk_size, cache)
        if self._forward_fallback and not self.plan.cached:
            self.jvp_mode = "forward"
            self.plan = self._make_plan(budget, chunk_size, cache)
        elif jvp == "auto" and self.jvp_mode == "linearize":
            # forward mode first, traced once its products have cost about one trace; the
            # plan is sized for the traced JVP
            self.jvp_mode = "forward"
            self.plan = dataclasses.replace(self.plan, jvp="forward", trace_after=LINEARIZE_AFTER_VECTORS)
        self.chunk_size = self.plan.chunk_size
        self.cache = self.plan.cached
        self.chunks = [
            slice(s, min(s + self.chunk_size, self.batch)) for s in range(0, self.batch, self.chunk_size)
        ]
        self._lin: dict[int, object] = {}
        self._scratch = Scratch()  # work buffers lent to the product paths
        self.total_M = self.M
        if self.group is not None:  # the rows of every rank (a collective: all ranks build)
            total = torch.tensor([self.M], dtype=torch.int64)
            torch.distributed.all_reduce(total, group=self.group)
            self.total_M = int(total)
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
    # -- copies: pickling and dtype changes rebuild the engine from a snapshot of the model --
    def snapshot_model(self, dtype: torch.dtype | None = None) -> nn.Module:
        """A copy of the model holding the parameters this engine was built at."""
        model = copy.deepcopy(self.fn.model)
        model.load_state_dict({n: t.detach() for n, t in self.full.items()}, strict=False)
        return model.to(dtype) if dtype is not None else model

    def rebuilt(self, dtype: torch.dtype | None = None) -> JacobianEngine:
        """A new engine over the same model snapshot and inputs, optionally in another dtype."""
        if self.group is not None:
            raise TypeError(
                "an operator split over a process group cannot be copied or "
                "pickled; rebuild it from the model and inputs on every rank"
            )
        config = dict(self.config)
        inputs = self.inputs
        if dtype is not None:
            inputs = inputs.to(dtype)
            h0 = config["h0"]
            if isinstance(h0, torch.Tensor):
                config["h0"] = h0.to(dtype)
            elif isinstance(h0, tuple):
                config["h0"] = tuple(t.to(dtype) for t in h0)
        return JacobianEngine(self.snapshot_model(dtype), inputs, **config)

    def dense_gram(self) -> torch.Tensor:
        """``G = Jᵀ J`` as a dense ``P × P`` tensor (``P`` products), cached: it backs exact
        solves and log-determinants of ``K + σ² I`` (:class:`lanczos_ntk.NTKPlusNoise`).
        """
        if getattr(self, "_dense_gram", None) is None:
            eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
            G = torch.cat([self.gram(eye[:, s : s + 256]) for s in range(0, self.P, 256)], dim=1)
            self.num_gram_vectors += self.P
            self._dense_gram = 0.5 * (G + G.T)
        return self._dense_gram

    def __reduce__(self):
        if self.group is not None:
            raise TypeError(
                "an operator split over a process group cannot be pickled; pickle "
                "the model and its trials and rebuild the operator on every rank"
            )
        return (_rebuild_engine, (self.snapshot_model(), self.inputs, self.config))

    def _check_h0(self, h0) -> None:
        tensors = h0 if isinstance(h0, tuple) else (h0,)
        for t in tensors:
            if (
                not isinstance(t, torch.Tensor)
                or t.dim() <= self._h0_dim
                or t.shape[self._h0_dim] != self.batch
            ):
                raise ValueError(
                    f"expected h0 with the trial dimension (dim {self._h0_dim}) of size "
                    f"{self.batch}, got {getattr(t, 'shape', type(t).__name__)}"
                )

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
        width: int | None = None
        step = max(1, PROBE_ELEMENTS // max(1, self.steps * 64))
        with torch.no_grad():
            for s in range(0, self.batch, step):
                sl = slice(s, min(s + step, self.batch))
                u, h0 = self.chunk_inputs(sl)
                try:
                    out = self.call(self.params, u, h0)
                except (RuntimeError, ValueError, TypeError, IndexError) as err:
                    if s > 0:  # the first piece ran: not a question of the inputs' shape
                        raise
                    raise ValueError(
                        f"{type(model).__name__}'s forward failed on inputs of shape "
                        f"{tuple(self.inputs.shape)} ([B, T, d_in]"
                        + ("" if h0 is None else f", with h0 of shape {tuple(h0.shape)}")
                        + f"): {err}"
                    ) from err
                if not isinstance(out, torch.Tensor) or out.dim() != 3 or out.shape[:2] != u.shape[:2]:
                    raise ValueError(
                        f"expected {type(model).__name__} outputs of shape "
                        f"[{u.shape[0]}, {self.steps}, c], got "
                        f"{getattr(out, 'shape', type(out).__name__)}"
                    )
                bad = ~torch.isfinite(out)
                if bad.any():
                    trial_time = bad.any(-1).nonzero()
                    first = trial_time[torch.argmin(trial_time[:, 1] * self.batch + trial_time[:, 0])]
                    raise ValueError(
                        f"non-finite states: first at trial {int(first[0]) + s}, "
                        f"time step {int(first[1])}; the dynamics diverge for these "
                        "inputs (lower the gain, the step dt or the input scale)"
                    )
                if width is None:
                    self._reference = out[:1].clone()  # trial 0, to validate a cell against
                width = out.shape[-1]
        assert width is not None  # the inputs hold at least one trial (check_inputs)
        return int(width)

    def _choose_jvp(self, jvp: str) -> str:
        model = self.fn.model
        states = self.fn.outputs == "states"
        if jvp in ("auto", "structured") and states:
            self._closed = closed_form(model, self.spec)
        if jvp == "structured" and not states:
            raise ValueError(
                "jvp='structured' covers outputs='states' only; use jvp='auto' for readouts and callables"
            )
        if jvp == "structured" and self._closed is None:
            raise ValueError(
                f"jvp='structured' needs a model with a structured Jacobian "
                f"(CTRNN, DiscreteRNN with their own dynamics); got {type(model).__name__}"
            )
        if self._closed is not None:
            return "structured"
        if jvp in ("auto", "cell") and states:
            u, h0 = self.chunk_inputs(slice(0, 1))
            self._cell = find_cell(model, self.width, self.full, u, h0, self._reference)
        if jvp == "cell" and self._cell is None:
            raise ValueError(
                f"jvp='cell' needs outputs='states' and a one-step cell that "
                f"reproduces the model's forward (a built-in model, a batch-first "
                f"torch RNN/GRU/LSTM, a module with step(h, u), or a forward that "
                f"loops over one update); "
                f"{type(model).__name__} has none"
            )
        if self._cell is not None:
            return "cell"
        if jvp not in ("auto", "linearize"):
            return jvp
        u, h0 = self.chunk_inputs(slice(0, 1))
        u = u[:, : min(2, self.steps)]
        try:
            tangents = {k: torch.zeros_like(v) for k, v in self.params.items()}
            torch.func.jvp(lambda p: self.call(p, u, h0), (self.params,), (tangents,))
        except (RuntimeError, NotImplementedError):
            if jvp == "linearize":
                raise ValueError(
                    f"jvp='linearize' needs forward-mode AD through "
                    f"{type(model).__name__}'s forward; use jvp='double_vjp'"
                ) from None
            return "double_vjp"
        if jvp == "linearize":
            return "linearize"
        # on a cached graph the VJP of a VJP reuses the forward; forward mode re-runs it
        # (the plan falls back to forward mode when the graphs do not fit the budget); large
        # chunks are linearised once (a traced JVP) when forward mode works
        self._forward_fallback = True
        if self.batch * self.steps * self.width >= LINEARIZE_MIN_OUTPUTS:
            return "linearize"
        return "double_vjp"

    # -- memory plan ---------------------------------------------------------------------------
    def _trial_bytes(self) -> tuple[int, int]:
        """Estimated bytes per trial: (cached linearisation, transient work per vector)."""
        isz = self.itemsize
        T, c = self.steps, self.width
        d = int(self.inputs.shape[-1])
        if self.jvp_mode == "structured":
            return T * (3 * c + d + 1) * isz, 5 * T * c * isz  # [a, u, 1], a', ∂ψ/∂z

        if self.jvp_mode == "cell":
            assert self._cell is not None  # "cell" is chosen only once a cell is found
            if self._cell.trial_bytes is not None:
                return self._cell.trial_bytes(d, T, isz)

        def graph_bytes(b):
            u, h0 = self.chunk_inputs(slice(0, b))
            if self.jvp_mode == "cell":
                # torch.func transforms refuse saved-tensor hooks: the direct term's graph is
                # measured through plain autograd on the probe's trajectory
                lin = CellLinearization(self._cell, self.spec, self.full, u, h0)
                theta = {k: v.clone().requires_grad_(True) for k, v in lin.theta.items()}

                def direct():
                    with torch.enable_grad():
                        lin._direct(theta)

                # the traced direct term keeps what its VJP and its VJP of the VJP read (each
                # at most what the graph saves; its blocks, or a cell it cannot trace, the graph)
                return 2 * saved_bytes(direct) + lin.prev.numel() * isz
            p = {k: v.clone().requires_grad_(True) for k, v in self.params.items()}

            def run():
                with torch.enable_grad():
                    self.call(p, u, h0)

            return saved_bytes(run)

        one = graph_bytes(1)
        per = graph_bytes(2) - one if self.batch >= 2 else one
        per = max(per, T * c * isz)
        if self.jvp_mode == "cell":
            # the direct term's graph and every step's (the same cell evaluations), each with
            # the graph of its VJP
            assert self._cell is not None  # "cell" is chosen only once a cell is found
            S = self._cell.state_size
            # per vector: the direct term and the tangents, the cotangents, a block's direct
            # term with its rows side by side (or one vector's), and the vector read row by row
            return 4 * per + T * d * isz, per + 5 * T * S * isz
        # the dual graph of a VJP of a VJP, or the traced JVP next to the VJP's graph; per
        # vector its outputs, its cotangents and the vector read row by row
        factor = 2 if self.jvp_mode in ("double_vjp", "linearize") else 1
        return factor * per + T * d * isz, per + 3 * T * c * isz

    def _make_plan(self, budget: int, chunk_size: int | None, cache: bool | None) -> ProductPlan:
        c, w = self._trial_bytes()
        B = self.batch
        if budget < c + w:
            raise ValueError(
                f"memory_budget of {budget / 2**20:.2f} MiB is too small for one trial "
                f"of this model (about {(c + w) / 2**20:.2f} MiB: "
                f"{c / 2**20:.2f} MiB linearisation + {w / 2**20:.2f} MiB work); "
                "raise memory_budget or use shorter trials"
            )
        if cache is None:
            cache = B * c + w * (chunk_size or 1) <= budget
        if chunk_size is None:
            room = budget - B * c if cache else budget
            chunk_size = max(1, min(B, int(room // (w if cache else c + w))))
        chunk_size = min(int(chunk_size), B)
        chunks = -(-B // chunk_size)
        held = B * c if cache else chunk_size * c
        columns = max(1, int((budget - held) // max(1, chunk_size * w)))
        cell = self._cell.name if self._cell is not None else ""
        return ProductPlan(
            path=_PATHS[self.jvp_mode],
            jvp=self.jvp_mode,
            cell=cell,
            trials=B,
            chunk_size=chunk_size,
            num_chunks=chunks,
            cached=bool(cache),
            cache_bytes=int(B * c) if cache else 0,
            work_bytes_per_vector=int(chunk_size * w),
            block_columns=columns,
            budget_bytes=budget,
        )

    # -- per chunk -----------------------------------------------------------------------------
    def _linearization(self, i: int):
        """Chunk ``i``'s linearisation: a closed-form or cell trajectory, or an autograd graph."""
        if i in self._lin:
            return self._lin[i]
        u, h0 = self.chunk_inputs(self.chunks[i])
        if self.jvp_mode == "structured":
            assert self._closed is not None  # "structured" is chosen only with a closed form
            lin = self._closed.linearize(self.full, u, h0)
        elif self.jvp_mode == "cell":
            assert self._cell is not None  # "cell" is chosen only once a cell is found
            if self._cell.closed_form is not None:
                lin = self._cell.closed_form(self.spec, self.full, u, h0)
            else:
                lin = CellLinearization(self._cell, self.spec, self.full, u, h0)
        else:
            lin = DualGraph(lambda q: self.call(q, u, h0), self.params)
            if self.jvp_mode == "linearize":  # J x by a traced JVP of the whole forward
                lin.linearized = self._trace(u, h0)
        if hasattr(lin, "scratch"):
            lin.scratch = self._scratch  # work buffers shared by the chunks, product to product
        if self.cache:
            self._lin[i] = lin
        return lin

    def _trace(self, u: torch.Tensor, h0):
        """A traced JVP of the whole forward on one chunk (``torch.func.linearize``)."""
        # products run inside linear_operator's autograd.Function, where forward-mode AD is
        # switched off: linearize would trace a zero JVP there
        with (
            warnings.catch_warnings(),
            forward_ad._set_fwd_grad_enabled(True),
            restoring_attributes(self.fn.model),
        ):
            # torch.fx's constant folding inside linearize warns about its own graph
            warnings.filterwarnings("ignore", message="Attempted to insert a get_attr", category=UserWarning)
            return torch.func.linearize(lambda q: self.call(q, u, h0), self.params)[1]

    def _column_passes(self, k: int, per_column: int, working_set: int) -> list[slice]:
        """Column groups of a block of ``k`` whose outputs (``per_column`` bytes each) stay
        within ``working_set`` per pass on the CPU (one pass on a GPU).
        """
        step = k if torch.device(self.device).type != "cpu" else max(1, working_set // max(per_column, 1))
        return [slice(s, min(s + step, k)) for s in range(0, k, step)]

    def vjp_chunk(self, i: int, V: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``J_iᵀ V`` for ``V [k, b, T, c]``; returns ``[k, P]``. With ``consume``, ``V`` is a
        work buffer that the product may overwrite (``J_i X`` inside ``Jᵀ J X``).
        """
        lin = self._linearization(i)
        if self.jvp_mode in ("structured", "cell"):
            return lin.vjp(V, consume=consume)
        return self.spec.flatten(lin.vjp(V), batch_dims=1)  # all k share one reverse pass

    def jvp_chunk(self, i: int, X: torch.Tensor) -> torch.Tensor:
        """``J_i X`` for ``X [k, P]``; returns ``[k, b, T, c]``."""
        if self.jvp_mode in ("structured", "cell"):
            lin = self._linearization(i)
            # the result is used (and copied) before the next product: a scratch buffer
            return lin.jvp(X, reuse_out=True)
        tangents = self.spec.unflatten(X)
        if self.jvp_mode == "forward":
            u, h0 = self.chunk_inputs(self.chunks[i])

            def one(t):
                return torch.func.jvp(lambda p: self.call(p, u, h0), (self.params,), (t,))[1]

            if X.shape[0] == 1:
                return one({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
            return torch.func.vmap(one)(tangents)
        if self.jvp_mode == "linearize":
            lin = self._linearization(i)
            if lin.linearized is None:  # a trace deferred by the plan (trace_after)
                lin.linearized = self._trace(*self.chunk_inputs(self.chunks[i]))
            jfn = lin.linearized
            with forward_ad._set_fwd_grad_enabled(True):
                if X.shape[0] == 1:
                    return jfn({n: t[0] for n, t in tangents.items()}).unsqueeze(0)
                sl = self.chunks[i]
                per = (sl.stop - sl.start) * self.steps * self.width * self.itemsize
                return torch.cat(
                    [
                        torch.func.vmap(jfn)({n: t[cols] for n, t in tangents.items()})
                        for cols in self._column_passes(X.shape[0], per, CPU_WORKING_SET)
                    ]
                )
        # VJP of a VJP: Jᵀ v0 is linear in v0, so its VJP along x is J x; all k share one pass.
        # The batched double backward carries [k, ...] intermediates through every node of the
        # graph: on the CPU, past DOUBLE_VJP_WORKING_SET of outputs per pass it turns memory
        # bound (4x the per-vector cost of single products with 13 MiB of outputs per vector),
        # so wide blocks go through in column groups
        g = self._linearization(i)
        passes = self._column_passes(X.shape[0], g.out.numel() * self.itemsize, DOUBLE_VJP_WORKING_SET)
        cols = torch.cat([g.jvp({n: t[c] for n, t in tangents.items()}) for c in passes])
        if not self.cache:
            g.release_dual()
        return cols

    # -- whole operator ------------------------------------------------------------------------
    def _split(self, V: torch.Tensor, i: int) -> torch.Tensor:
        """Chunk ``i``'s rows of ``V [M, k]`` as ``[k, b, T, c]``, each vector contiguous (a
        work buffer, valid until the next product, when ``V`` is row-major).
        """
        sl = self.chunks[i]
        n_per = self.steps * self.width
        rows = _vector_rows(V[sl.start * n_per : sl.stop * n_per], self._scratch)
        return rows.view(V.shape[1], sl.stop - sl.start, self.steps, self.width)

    def _columns(self, k: int):
        """Column groups of a block of ``k`` vectors that fit the budget in one pass."""
        step = self.plan.block_columns
        return [slice(s, min(s + step, k)) for s in range(0, k, step)]

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``Jᵀ V`` for ``V [M, k]``; returns ``[P, k]`` (one pass over the chunks)."""
        out = torch.zeros(V.shape[1], self.P, dtype=self.dtype, device=self.device)
        for cols in self._columns(V.shape[1]):
            for i in range(len(self.chunks)):
                out[cols] += self.vjp_chunk(i, self._split(V[:, cols], i))
        self.num_vjp_vectors += V.shape[1]
        return self._reduce(out).T

    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``J X`` for ``X [P, k]``; returns ``[M, k]`` (one pass over the chunks), stored
        vector by vector (the transpose of a contiguous ``[k, M]``).
        """
        Xt = X.T.contiguous()
        out = torch.empty(X.shape[1], self.M, dtype=self.dtype, device=self.device)
        n_per = self.steps * self.width
        for cols in self._columns(X.shape[1]):
            for i, sl in enumerate(self.chunks):
                part = self.jvp_chunk(i, Xt[cols])  # [k, b, T, c], often a permuted view
                # one copy per vector into its own row: reshaping the part first copied it
                # twice, the second time through a strided column (10 ms of a 23 ms product at
                # 3.3M states), and rows of [M, k] (k innermost) cost 4 ms per vector at k=10
                out[cols, sl.start * n_per : sl.stop * n_per].view(part.shape).copy_(part)
        self._count_jvp(X.shape[1])
        return out.T

    def _count_jvp(self, k: int) -> None:
        """Count ``J x`` vectors; switch a deferred trace on once the plan says so."""
        self.num_jvp_vectors += k
        after = self.plan.trace_after
        if after is not None and self.jvp_mode == "forward" and self.num_jvp_vectors >= after:
            self.jvp_mode = "linearize"
            self.plan = dataclasses.replace(self.plan, jvp="linearize")

    def ntk(self, V: torch.Tensor) -> torch.Tensor:
        """``J Jᵀ V``: a reverse pass, then a forward pass over the chunks."""
        return self.jvp(self.vjp(V))

    def gram(self, X: torch.Tensor) -> torch.Tensor:
        """``Jᵀ J X``: one pass over the chunks (each chunk's ``J_iᵀ J_i X`` accumulates)."""
        Xt = X.T.contiguous()
        out = torch.zeros_like(Xt)
        for cols in self._columns(X.shape[1]):
            for i in range(len(self.chunks)):
                out[cols] += self.vjp_chunk(i, self.jvp_chunk(i, Xt[cols]), consume=True)
        self._count_jvp(X.shape[1])
        self.num_vjp_vectors += X.shape[1]
        return self._reduce(out).T

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """Sum a ``P``-sized result over the ranks of the process group (data parallelism)."""
        if self.group is not None:
            torch.distributed.all_reduce(out, group=self.group)
        return out


def _vector_rows(V: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """``V [M, k]`` as ``[k, M]``, each vector contiguous (a view when it already is; else
    in a work buffer of ``scratch``, valid until the next product).

    A block usually arrives row-major (the ``k`` entries of a state together). On the CPU the
    transpose goes through a product with the identity, which is exact in full precision (one
    nonzero term per entry; a ``-0.0`` may come back as ``0.0``) and 4x faster than a strided
    copy (``3.3M × 10``: 11 against 41 ms); the copy serves when the product is not finite
    (``0 · inf`` would spread to the other vectors), when float32 products run in reduced
    precision, and on other devices (where it is bandwidth bound, and the test would
    synchronise).
    """
    Vt = V.T
    if Vt.is_contiguous() or V.shape[1] == 1:
        return Vt.contiguous()
    k, rows = Vt.shape
    # one flat buffer the size of the largest chunk's rows, so that an uneven last chunk takes a
    # prefix of it instead of a new allocation
    buf = scratch.get("engine.rows", (max(k * rows, scratch.sizes.get("engine.rows", 0)),), V)
    out = buf[: k * rows].view(k, rows)
    if V.device.type == "cpu" and _exact_matmul(V.dtype):
        torch.mm(torch.eye(k, dtype=V.dtype), Vt, out=out)
        if bool(torch.isfinite(out.sum())):
            return out
    return out.copy_(Vt)


def _exact_matmul(dtype: torch.dtype) -> bool:
    """Whether a CPU matrix product in ``dtype`` is carried out in full precision (float64, or
    float32 unless torch was told to use reduced precision, e.g. bfloat16 passes, for float32
    matrix products: those would round the entries the identity picks out).
    """
    if dtype == torch.float64:
        return True
    if dtype != torch.float32 or torch.get_float32_matmul_precision() != "highest":
        return False
    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return getattr(mkldnn, "fp32_precision", "none") in ("none", "ieee")


def _rebuild_engine(model: nn.Module, inputs: torch.Tensor, config: dict) -> JacobianEngine:
    """Unpickling: build the engine again (caches and plans are made anew)."""
    return JacobianEngine(model, inputs, **config)
