"""Closed-form Jacobian products for batch-first ``torch.nn.RNN`` / ``GRU`` / ``LSTM``.

The cell equations of torch's recurrent layers are known, so their linearisation along a
trajectory needs no autodiff: one no-grad pass stores, per layer and step, the layer's input,
its previous hidden state and a few elementwise coefficients (derivatives of the gates). Then

- ``J x``: the parameter part of every gate pre-activation for all trials and steps at once (one
  matrix product per weight), followed by the time recurrence, which per step and layer is one
  product with the recurrent weight ``W_hh`` and a handful of elementwise operations;
- ``Jᵀ v``: the adjoint recurrence, storing the gate cotangents of every step, then every
  weight's gradient as one matrix product over all trials and steps.

Per step this reads ``W_hh`` and ``O(b·H)`` coefficients instead of a ``b × S × S`` state
Jacobian, and building it costs one forward pass instead of ``S`` tangent passes.

Gate derivatives (torch's gate order; ``σ' = σ(1-σ)``):

- RNN: ``h' = φ(a)``, ``δh' = φ'(a) δa``.
- GRU: ``h' = (1-z) n + z h``, ``n = tanh(a_n + r ⊙ g_n)``, so
  ``δh' = z δh + c_r (δa_r + δg_r) + c_z (δa_z + δg_z) + c_n δa_n + c_n r δg_n`` with
  ``c_n = (1-z)(1-n²)``, ``c_r = c_n g_n r(1-r)``, ``c_z = (h-n) z(1-z)``.
- LSTM: ``c' = f c + i g``, ``h' = o tanh(c')``, so
  ``δc' = f δc + g σ'_i δp_i + c σ'_f δp_f + i(1-g²) δp_g`` and
  ``δh' = tanh(c') σ'_o δp_o + o(1 - tanh² c') δc'``.

(``a`` = input part ``x W_ihᵀ + b_ih``, ``g`` = recurrent part ``h W_hhᵀ + b_hh``, ``p = a + g``.)
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ._dual_graph import DualGraph
from ._scratch import Scratch, fresh, writable

__all__ = ["TorchRNNLinearization", "rnn_kind", "trial_bytes"]

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
FUSED_VJP = ("lstm",)  # kinds whose single-vector Jᵀ v goes through the module's own backward
# ... while a chunk holds at most this many state numbers b·T·H: past it the explicit adjoint
# recurrence is the faster (per Jᵀ v, 2 threads, fused / explicit: 0.61 at b=64, T=50,
# H=64; 0.91 at b=256, T=100, H=64; 1.25 at b=256, T=100, H=128)
FUSED_VJP_MAX_STATES = 2_000_000
BLOCK_BYTES = 8 << 20  # the parameter parts and gate cotangents go through in blocks of steps this size
_COEFS = {"lstm": 6, "gru": 7, "rnn_tanh": 1, "rnn_relu": 1}  # stored coefficients, in units of H


def rnn_kind(model: nn.Module) -> str:
    """``"rnn_tanh"``, ``"rnn_relu"``, ``"gru"`` or ``"lstm"``."""
    if isinstance(model, nn.LSTM):
        return "lstm"
    if isinstance(model, nn.GRU):
        return "gru"
    return "rnn_" + cast(nn.RNN, model).nonlinearity  # a plain nn.RNN once LSTM/GRU are ruled out


def trial_bytes(kind: str, layers: int, hidden: int, d: int, T: int, itemsize: int):
    """Bytes per trial: (the stored linearisation, the transient work of one vector)."""
    H, g = hidden, _GATES[kind] * hidden
    inputs = d + (layers - 1) * H
    cached = T * (inputs + layers * (H + 1 + _COEFS[kind] * H))  # [h_prev, 1, x], coefficients
    if kind in FUSED_VJP:
        cached += T * (inputs + layers * (g + 3 * H))  # the module's retained graph (gates, states)
    cotangents = (2 if kind == "gru" else 1) * layers * g
    work = T * (2 * layers * g + cotangents + 3 * H)  # parameter parts, μ, outputs, v by rows
    return cached * itemsize, work * itemsize


class TorchRNNLinearization:
    """The linearisation of a torch RNN/GRU/LSTM along one chunk's trajectory.

    Parameters
    ----------
    kind : from :func:`rnn_kind`; layers, hidden : ``num_layers``, ``hidden_size``
    spec : the engine's :class:`~lanczos_ntk.operators._functional.ParamSpec` (differentiated names)
    params : all parameters by name; u : inputs ``[b, T, d]``
    s0 : the flat initial state ``[b, S]`` (hidden states of every layer, then cell states)
    """

    scratch: Scratch | None = None  # work buffers lent by the engine

    def __init__(self, kind: str, layers: int, hidden: int, spec, params, u, s0, module_states=None):
        self.kind, self.L, self.H, self.spec = kind, layers, hidden, spec
        # the LSTM's ``Jᵀ v`` of one vector by the module's own fused backward through a
        # retained graph, on chunks up to FUSED_VJP_MAX_STATES (medium size: 2.0 ms against
        # 3.3 ms for the explicit recurrence; for the GRU torch's backward is the slower, 8.2
        # against 4.7 ms, and for a block of 10 the two are even); blocks, ``J x`` and larger
        # chunks go through the explicit recurrences below
        b, T, _ = u.shape
        fused = kind in FUSED_VJP and b * T * hidden * layers <= FUSED_VJP_MAX_STATES
        self.graph = (
            DualGraph(module_states, {n: params[n] for n in spec.names})
            if module_states is not None and fused
            else None
        )
        self.shape = (b, T)
        H, L = hidden, layers
        self.w_ih = [params[f"weight_ih_l{l}"] for l in range(L)]
        self.w_hh = [params[f"weight_hh_l{l}"] for l in range(L)]
        bias = [(params.get(f"bias_ih_l{l}"), params.get(f"bias_hh_l{l}")) for l in range(L)]
        hs = list(s0.split(H, dim=-1))
        cs = hs[L:]
        hs = hs[:L]
        x_seq = u.transpose(0, 1)  # [T, b, d] time-major
        # per layer, time-major: ``[h_prev, 1, x]`` ([T, b, H + 1 + in]: the previous state, a
        # column of ones for the biases, the layer's input), so that the parameter part of the
        # pre-activations is one matrix product; and the coefficients
        self.src: list[torch.Tensor] = []
        self.coef: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for l in range(L):
                w_ih, w_hh = self.w_ih[l], self.w_hh[l]
                b_ih, b_hh = bias[l]
                a_all = x_seq @ w_ih.T  # [T, b, gH] in one product
                if b_ih is not None:
                    a_all = a_all + b_ih
                h = hs[l]
                c = cs[l] if kind == "lstm" else None
                prev, outs, coefs = [], [], []
                for t in range(T):
                    prev.append(h)
                    g = h @ w_hh.T
                    if b_hh is not None:
                        g = g + b_hh
                    h, c, k = _step(kind, a_all[t], g, h, c)
                    outs.append(h)
                    coefs.append(k)
                ones = x_seq.new_ones(*x_seq.shape[:2], 1)
                self.src.append(torch.cat([torch.stack(prev), ones, x_seq], -1))
                self.coef.append({key: torch.stack([k[key] for k in coefs]) for key in coefs[0]})
                x_seq = torch.stack(outs)  # the next layer's input
        # per layer and step, the coefficients shaped to broadcast over the k vectors of a
        # block ([b, 1, H] or [b, 1, gates, H]); made once, so a product indexes no tensors
        self.per_step = [_broadcast_coefficients(kind, c, T, H) for c in self.coef]

    # -- products ---------------------------------------------------------------------------
    def _groups(self, l: int) -> list[tuple[slice, list[tuple[tuple[str, ...], int]]]]:
        """Layer ``l``'s parameter groups: the columns of ``src`` each multiplies, and per row
        block of the product the parameters it holds (both biases multiply the column of ones)
        and its width. The GRU's gates treat the input and recurrent parts differently: two
        groups, input part first; the other kinds sum them: one.
        """
        H = self.H
        n_in = self.src[l].shape[-1] - H - 1
        w_ih, w_hh, b_ih, b_hh = (f"{n}_l{l}" for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
        if self.kind == "gru":
            return [
                (slice(H, None), [((b_ih,), 1), ((w_ih,), n_in)]),
                (slice(0, H + 1), [((w_hh,), H), ((b_hh,), 1)]),
            ]
        return [(slice(0, None), [((w_hh,), H), ((b_ih, b_hh), 1), ((w_ih,), n_in)])]

    def _moves(self, l: int, g: int, names: set[str]) -> bool:
        """Whether a parameter of layer ``l``'s group ``g`` (see :meth:`_groups`) is differentiated."""
        return any(n in names for group, _ in self._groups(l)[g][1] for n in group)

    def _span(self, k: int, itemsize: int) -> int:
        """Steps per block of the parameter parts and the gate cotangents: ``[τ, b, k, gH]``
        tensors of at most BLOCK_BYTES, reused block after block (a tensor over the C
        allocator's mapping threshold, 32 MiB, is mapped and zeroed anew on every product:
        a third of the GRU's product at b=256, T=100, H=128).
        """
        b, T = self.shape
        per_step = b * k * _GATES[self.kind] * self.H * itemsize
        return max(1, min(T, BLOCK_BYTES // max(per_step, 1)))

    def _param_rows(self, tang: dict, k: int) -> list[list[torch.Tensor | None]]:
        """Per layer and parameter group, the tangents as ``[cols, k·gH]`` (None where no
        parameter of the group moves), so that a block of steps' parameter part is
        ``src[block][:, cols] @ rows``.
        """
        gH = _GATES[self.kind] * self.H
        out = []
        for l in range(self.L):
            layer: list[torch.Tensor | None] = []
            for _, blocks in self._groups(l):
                moving = [[tang[n] for n in names if n in tang] for names, _ in blocks]
                if not any(moving):
                    layer.append(None)
                    continue
                rows = [
                    sum(ts[1:], ts[0]).reshape(k, gH, w).permute(2, 0, 1).reshape(w, k * gH)
                    if ts
                    else self.src[l].new_zeros(w, k * gH)
                    for ts, (_, w) in zip(moving, blocks)
                ]
                layer.append(torch.cat(rows))
            out.append(layer)
        return out

    def _param_parts(self, rows: list, k: int, t0: int, t1: int, into: list) -> list:
        """Per layer, the parameter part of the pre-activations of steps ``t0 .. t1 - 1``,
        ``[t1 - t0, b, k, gH]`` written into ``into`` (None where no parameter moves):
        ``(input part, recurrent part)`` for the GRU, else their sum. One matrix product per
        part over the columns ``[h_prev, 1, x]``.
        """
        b, _ = self.shape
        gH = _GATES[self.kind] * self.H
        parts = []
        for l in range(self.L):
            src = self.src[l][t0:t1].reshape((t1 - t0) * b, -1)
            layer: list[torch.Tensor | None] = []
            for g, ((cols, _), m) in enumerate(zip(self._groups(l), rows[l])):
                if m is None:
                    layer.append(None)
                    continue
                buf = into[l][g][: t1 - t0]
                torch.mm(src[:, cols], m, out=buf.view((t1 - t0) * b, k * gH))
                layer.append(buf)
            parts.append(layer)
        return parts

    def jvp(self, X: torch.Tensor, reuse_out: bool = False) -> torch.Tensor:
        """``[k, P] -> [k, b, T, H]`` (with ``reuse_out``, a view of a scratch buffer that the
        next product overwrites).
        """
        k = X.shape[0]
        b, T = self.shape
        H, L, kind = self.H, self.L, self.kind
        gH = _GATES[kind] * H
        rows_of = self._param_rows(self.spec.unflatten(X), k)
        span = self._span(k, X.element_size())
        into = [
            [
                fresh(f"rnn.parts{l}.{g}", (span, b, k, gH), X, self.scratch)
                for g in range(len(self._groups(l)))
            ]
            for l in range(L)
        ]
        zero = X.new_zeros(1, 1, gH).expand(b, k, gH)  # no parameter of a layer moves
        rows = b * k
        dh: list[torch.Tensor | None] = [None] * L  # [b·k, H]; None while zero (fixed start)
        dc: list[torch.Tensor | None] = [None] * L
        ys = fresh(
            "rnn.jvp", (T, b, k, H), X, self.scratch if reuse_out else None
        )  # the top layer's tangents
        # made once per product, not per step: the transposed weights, the top layer's rows
        # per step, and for the LSTM the gates times their coefficients and the cell tangents
        # (two buffers, this step's and the previous one)
        w_ihT = [w.T for w in self.w_ih]
        w_hhT = [w.T for w in self.w_hh]
        tops = ys.unbind(0)
        if kind == "lstm":
            m4 = [fresh(f"rnn.m{l}", (b, k, 4, H), X, self.scratch) for l in range(L)]
            ifg, og = [m[:, :, :3] for m in m4], [m[:, :, 3] for m in m4]
            cells = [[fresh(f"rnn.c{l}.{j}", (b, k, H), X, self.scratch) for j in (0, 1)] for l in range(L)]
        parts: list = []
        for t in range(T):
            if t % span == 0:
                parts = self._param_parts(rows_of, k, t, min(T, t + span), into)
            i = t % span
            dx = None  # the tangent of the layer's input [b·k, ·] (None: the fixed inputs)
            for l in range(L):
                co, h_prev = self.per_step[l][t], dh[l]
                dest = tops[t] if l == L - 1 else None
                if kind == "gru":
                    a = _plus_product(parts[l][0], i, zero, rows, dx, w_ihT[l])
                    g = _plus_product(parts[l][1], i, zero, rows, h_prev, w_hhT[l])
                    s = torch.sum(
                        (a.view(b, k, 3, H) * co["a"]).addcmul_(g.view(b, k, 3, H), co["g"]), 2, out=dest
                    )
                    if h_prev is not None:
                        s = s.addcmul_(co["z"], h_prev.view(b, k, H))
                    new = s.view(rows, H)
                else:
                    p = _plus_product(parts[l][0], i, zero, rows, dx, w_ihT[l])
                    if h_prev is not None:
                        p = p.addmm_(h_prev, w_hhT[l])  # p is this product's own buffer
                    if kind == "lstm":
                        torch.mul(p.view(b, k, 4, H), co["io"], out=m4[l])  # every gate times its coefficient
                        c_new = torch.sum(ifg[l], 2, out=cells[l][t & 1])
                        c_prev = dc[l]
                        if c_prev is not None:
                            c_new.addcmul_(co["f"], c_prev)
                        dc[l] = c_new
                        new = torch.addcmul(og[l], co["beta"], c_new, out=dest).view(rows, H)
                    else:
                        new = torch.mul(p.view(b, k, H), co["d"], out=dest).view(rows, H)
                dh[l] = dx = new
        return ys.permute(2, 1, 0, 3)  # [k, b, T, H]

    def vjp(self, V: torch.Tensor, consume: bool = False) -> torch.Tensor:
        """``[k, b, T, H] -> [k, P]``. The adjoint recurrence accumulates into a time-major
        copy of ``V``; with ``consume`` (``V`` a work buffer the caller gives up, already
        time-major when it is ``J x`` of this path), into ``V`` itself.
        """
        k = V.shape[0]
        if k == 1 and self.graph is not None:
            return self.spec.flatten(self.graph.vjp(V), batch_dims=1)
        b, T = self.shape
        H, L, kind = self.H, self.L, self.kind
        Vt = writable(V.permute(2, 1, 0, 3), consume, "rnn.vjp", self.scratch)  # [T, b, k, H]
        gates = _GATES[kind]
        gru = kind == "gru"
        span = self._span(k, V.element_size())
        # the gate cotangents of a block of steps: input part, and recurrent part (the GRU's;
        # the other kinds' are the same), reused block after block
        mu_a = [fresh(f"rnn.mu_a{l}", (span, b, k, gates * H), V, self.scratch) for l in range(L)]
        mu_g = mu_a
        if gru:
            mu_g = [fresh(f"rnn.mu_g{l}", (span, b, k, gates * H), V, self.scratch) for l in range(L)]
        names = set(self.spec.names)
        # the GRU's first-layer input-gate cotangents feed no recurrence: made block by block
        # (where its input weights move) from the layer's state cotangents, which with one
        # layer are those in Vt
        gates_a0 = gru and self._moves(0, 0, names)
        if gates_a0:
            lam0 = Vt if L == 1 else fresh("rnn.lam0", (span, b, k, H), V, self.scratch)
        sums: dict[tuple[int, int], torch.Tensor] = {}  # (layer, group) -> [cols, k·gH]
        rows = b * k
        lh: list[torch.Tensor | None] = [None] * L  # cotangents of each layer's new state
        lc: list[torch.Tensor | None] = [None] * L
        lh[L - 1] = Vt[T - 1]
        for t in range(T - 1, -1, -1):
            i = t % span
            # lh[L - 1] is Vt[t]: v_t plus what step t + 1 sent back (added in place)
            lx = None
            for l in range(L - 1, -1, -1):
                co, ma, mg = self.per_step[l][t], mu_a[l][i], mu_g[l][i]
                terms = [x.view(b, k, H) for x in (lh[l], lx) if x is not None]
                if gates_a0 and l == 0 and L > 1:
                    lam = lam0[i]
                    if len(terms) == 2:
                        torch.add(*terms, out=lam)
                    else:
                        lam.copy_(terms[0])
                else:
                    lam = terms[0] if len(terms) == 1 else terms[0] + terms[1]  # never none
                if gru:
                    if l > 0:
                        torch.mul(lam.unsqueeze(2), co["a"], out=ma.view(b, k, 3, H))
                    torch.mul(lam.unsqueeze(2), co["g"], out=mg.view(b, k, 3, H))
                elif kind == "lstm":
                    cl = lc[l]
                    total = lam * co["beta"] if cl is None else cl.addcmul(co["beta"], lam)
                    m4 = ma.view(b, k, 4, H)
                    torch.mul(total.unsqueeze(2), co["ifg"], out=m4[:, :, :3])
                    torch.mul(lam, co["o"], out=m4[:, :, 3])
                    lc[l] = co["f"] * total
                else:
                    torch.mul(lam, co["d"], out=ma)
                if t > 0:  # the initial state is fixed: no cotangent needed for it
                    g2 = mg.view(rows, gates * H)
                    if l == L - 1:  # into v_{t-1}, in place
                        prev = Vt[t - 1]
                        if gru:
                            prev.addcmul_(co["z"], lam)
                        lh[l] = prev.view(rows, H).addmm_(g2, self.w_hh[l])
                    elif gru:
                        lh[l] = torch.addmm((co["z"] * lam).view(rows, H), g2, self.w_hh[l])
                    else:
                        lh[l] = g2 @ self.w_hh[l]
                lx = ma.view(rows, gates * H) @ self.w_ih[l] if l > 0 else None
            if i == 0:  # a block of steps done: its share of the weights' gradients
                t1 = min(T, t + span)
                if gates_a0:  # the first layer's input-gate cotangents, for the whole block
                    n = t1 - t
                    lam = (Vt[t:t1] if L == 1 else lam0[:n]).unsqueeze(3)
                    coef = self.coef[0]["a"][t:t1].view(n, b, 1, 3, H)
                    torch.mul(lam, coef, out=mu_a[0][:n].view(n, b, k, 3, H))
                for l in range(L):
                    src = self.src[l][t:t1].reshape((t1 - t) * b, -1)
                    for g, ((cols, _), mu) in enumerate(zip(self._groups(l), (mu_a[l], mu_g[l]))):
                        if not self._moves(l, g, names):
                            continue
                        # as [cols, rows] x [rows, k·gH]: the few columns of the input group
                        # as the short side of the product (the other way round, [k·gH, rows] x
                        # [rows, 3], took 5.1 against 0.9 ms for the GRU at b=256, T=100, H=128)
                        m = mu[: t1 - t].reshape((t1 - t) * b, -1)
                        if (l, g) in sums:
                            sums[l, g].addmm_(src[:, cols].T, m)
                        else:
                            sums[l, g] = src[:, cols].T @ m
        # every weight's and bias's gradient: [k·gH, cols] per group, summed over the blocks
        grads = {}
        for (l, g), summed in sums.items():
            total = summed.T
            _, blocks = self._groups(l)[g]
            full = total.view(k, gates * H, -1)
            for piece, (group, _) in zip(full.split([w for _, w in blocks], dim=-1), blocks):
                for n in group:
                    if n in names:
                        grads[n] = piece[..., 0] if n.startswith("bias") else piece
        return self.spec.flatten(grads, batch_dims=1)


def _plus_product(part, i: int, zero: torch.Tensor, rows: int, x, wT: torch.Tensor) -> torch.Tensor:
    """``part[i] + x wᵀ`` as ``[rows, ·]`` (``x`` None: no product; ``wT`` the transposed
    weight), in place in ``part`` (this product's own buffer); a new tensor when ``part`` is
    None (no parameter of it moves), which the caller may also write into.
    """
    if part is None:
        base = zero.reshape(rows, -1)
        return base.clone() if x is None else torch.addmm(base, x, wT)
    out = part[i].view(rows, -1)
    return out if x is None else out.addmm_(x, wT)


def _broadcast_coefficients(kind: str, coef: dict, T: int, H: int) -> list[dict[str, torch.Tensor]]:
    """Per step ``t``, the layer's coefficients as ``[b, 1, H]`` (or ``[b, 1, gates, H]`` for
    the gate-stacked ones), which broadcast over the ``k`` vectors of a block.
    """
    shaped = {}
    for key, v in coef.items():  # v: [T, b, width]
        width = v.shape[-1]
        shaped[key] = v.view(T, v.shape[1], 1, width // H, H) if width > H else v.unsqueeze(2)
    steps = [{key: v[t] for key, v in shaped.items()} for t in range(T)]
    if "io" in shaped:  # the LSTM's input, forget and cell gates, and its output gate: views
        for co in steps:
            co["ifg"], co["o"] = co["io"][:, :, :3], co["io"][:, :, 3]
    return steps


def _step(kind, a, g, h, c):
    """One layer's step on primal values: ``(h', c', coefficients)`` (coefficients ``[b, ·]``)."""
    if kind == "lstm":
        i, f, gg, o = (a + g).chunk(4, dim=-1)
        i, f, gg, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)
        c_new = f * c + i * gg
        tc = torch.tanh(c_new)
        h_new = o * tc
        coef = {  # the gates' coefficients in torch's gate order (i, f, g, o)
            "io": torch.cat([gg * i * (1 - i), c * f * (1 - f), i * (1 - gg * gg), tc * o * (1 - o)], -1),
            "beta": o * (1 - tc * tc),
            "f": f,
        }
        return h_new, c_new, coef
    if kind == "gru":
        ar, az, an = a.chunk(3, dim=-1)
        gr, gz, gn = g.chunk(3, dim=-1)
        r, z = torch.sigmoid(ar + gr), torch.sigmoid(az + gz)
        n = torch.tanh(an + r * gn)
        h_new = (1 - z) * n + z * h
        cn = (1 - z) * (1 - n * n)
        cr = cn * gn * r * (1 - r)
        cz = (h - n) * z * (1 - z)
        return h_new, None, {"a": torch.cat([cr, cz, cn], -1), "g": torch.cat([cr, cz, cn * r], -1), "z": z}
    pre = a + g
    if kind == "rnn_tanh":
        h_new = torch.tanh(pre)
        return h_new, None, {"d": 1 - h_new * h_new}
    h_new = torch.relu(pre)
    return h_new, None, {"d": (pre > 0).to(pre.dtype)}
