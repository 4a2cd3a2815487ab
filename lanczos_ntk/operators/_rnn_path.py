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

__all__ = ["TorchRNNLinearization", "rnn_kind", "trial_bytes"]

_GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
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
    cached = T * (inputs + layers * (H + _COEFS[kind] * H))  # x, h_prev, coefficients
    cotangents = (2 if kind == "gru" else 1) * layers * g
    work = T * (2 * layers * g + cotangents + 2 * H)  # parameter parts, μ, outputs
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

    def __init__(self, kind: str, layers: int, hidden: int, spec, params, u, s0):
        self.kind, self.L, self.H, self.spec = kind, layers, hidden, spec
        b, T, _ = u.shape
        self.shape = (b, T)
        H, L = hidden, layers
        self.w_ih = [params[f"weight_ih_l{l}"] for l in range(L)]
        self.w_hh = [params[f"weight_hh_l{l}"] for l in range(L)]
        bias = [(params.get(f"bias_ih_l{l}"), params.get(f"bias_hh_l{l}")) for l in range(L)]
        hs = list(s0.split(H, dim=-1))
        cs = hs[L:]
        hs = hs[:L]
        x_seq = u.transpose(0, 1)  # [T, b, d] time-major
        # per layer, time-major [T, b, ·]: the layer's input, its previous state, coefficients
        self.x: list[torch.Tensor] = []
        self.h_prev: list[torch.Tensor] = []
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
                self.x.append(x_seq)
                self.h_prev.append(torch.stack(prev))
                self.coef.append({key: torch.stack([k[key] for k in coefs]) for key in coefs[0]})
                x_seq = torch.stack(outs)  # the next layer's input

    # -- products ---------------------------------------------------------------------------
    def _param_parts(self, tang: dict, k: int):
        """Per layer, the parameter part of the input and recurrent pre-activations for every
        trial and step: ``[T, b, k, gH]`` each (None where no parameter of it moves).
        """
        parts = []
        for l in range(self.L):
            layer = []
            for src, w, bname in (
                (self.x[l], f"weight_ih_l{l}", f"bias_ih_l{l}"),
                (self.h_prev[l], f"weight_hh_l{l}", f"bias_hh_l{l}"),
            ):
                part = None
                if w in tang:  # one product for all rows and columns: [T·b, in] @ [in, k·gH]
                    dw = tang[w]  # [k, gH, in]
                    T, b, n_in = src.shape
                    part = (src.reshape(T * b, n_in) @ dw.permute(2, 0, 1).reshape(n_in, -1)).view(
                        T, b, k, -1
                    )
                if bname in tang:
                    db = tang[bname].unsqueeze(0).unsqueeze(0)  # [1, 1, k, gH]
                    part = db if part is None else part + db
                layer.append(part)
            parts.append(layer)
        return parts

    def jvp(self, X: torch.Tensor) -> torch.Tensor:
        """``[k, P] -> [k, b, T, H]``."""
        k = X.shape[0]
        b, T = self.shape
        H, L = self.H, self.L
        parts = self._param_parts(self.spec.unflatten(X), k)
        dh: list[torch.Tensor | None] = [
            None
        ] * L  # state tangents [b, k, H]; None while zero (the initial state is fixed)
        dc = [None] * L
        ys: list[torch.Tensor] = []
        for t in range(T):
            dx = None
            for l in range(L):
                pa, pg = parts[l]
                a = pa[t] if pa is not None else None
                if dx is not None:
                    a = dx @ self.w_ih[l].T if a is None else a + dx @ self.w_ih[l].T
                g = pg[t] if pg is not None else None
                if dh[l] is not None:
                    g = dh[l] @ self.w_hh[l].T if g is None else g + dh[l] @ self.w_hh[l].T
                dh[l], dc[l] = _tangent(
                    self.kind,
                    {key: v[t] for key, v in self.coef[l].items()},
                    a,
                    g,
                    dh[l],
                    dc[l],
                    (b, k, H),
                    X,
                )
                dx = dh[l]
            last = dh[L - 1]
            assert last is not None  # every layer's step sets its state tangent
            ys.append(last)
        return torch.stack(ys).permute(2, 1, 0, 3)  # [T, b, k, H] -> [k, b, T, H]

    def vjp(self, V: torch.Tensor) -> torch.Tensor:
        """``[k, b, T, H] -> [k, P]``."""
        k = V.shape[0]
        b, T = self.shape
        H, L = self.H, self.L
        Vt = V.permute(2, 1, 0, 3)  # [T, b, k, H]
        gates = _GATES[self.kind]
        mu_a = [V.new_empty(T, b, k, gates * H) for _ in range(L)]  # input-part cotangents
        mu_g = mu_a if self.kind != "gru" else [V.new_empty(T, b, k, gates * H) for _ in range(L)]
        lh = [V.new_zeros(b, k, H) for _ in range(L)]  # cotangents of each layer's new state
        lc = [V.new_zeros(b, k, H) for _ in range(L)] if self.kind == "lstm" else [None] * L
        for t in range(T - 1, -1, -1):
            lh[L - 1] = lh[L - 1] + Vt[t]
            lx = None
            for l in range(L - 1, -1, -1):
                lam = lh[l] if lx is None else lh[l] + lx
                ma, mg, keep_h, lc[l] = _adjoint(
                    self.kind, {key: v[t] for key, v in self.coef[l].items()}, lam, lc[l]
                )
                mu_a[l][t] = ma
                if mg is not ma:
                    mu_g[l][t] = mg
                if t > 0:  # the initial state is fixed: no cotangent needed for it
                    back = mg @ self.w_hh[l]
                    lh[l] = back if keep_h is None else keep_h + back
                lx = ma @ self.w_ih[l] if l > 0 else None
        grads = {}
        for l in range(L):
            for mu, src, w, bname in (
                (mu_a[l], self.x[l], f"weight_ih_l{l}", f"bias_ih_l{l}"),
                (mu_g[l], self.h_prev[l], f"weight_hh_l{l}", f"bias_hh_l{l}"),
            ):
                flat = mu.reshape(T * b, -1)  # [T·b, k·gH]
                if w in self.spec.names:
                    n_in = src.shape[-1]
                    grads[w] = (flat.T @ src.reshape(T * b, n_in)).view(k, -1, n_in)
                if bname in self.spec.names:
                    grads[bname] = flat.sum(0).view(k, -1)
        return self.spec.flatten(grads, batch_dims=1)


def _step(kind, a, g, h, c):
    """One layer's step on primal values: ``(h', c', coefficients)`` (coefficients ``[b, ·]``)."""
    if kind == "lstm":
        i, f, gg, o = (a + g).chunk(4, dim=-1)
        i, f, gg, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)
        c_new = f * c + i * gg
        tc = torch.tanh(c_new)
        h_new = o * tc
        coef = {
            "ifg": torch.cat([gg * i * (1 - i), c * f * (1 - f), i * (1 - gg * gg)], -1),
            "o": tc * o * (1 - o),
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


def _tangent(kind, k, a, g, dh, dc, shape, like):
    """One layer's tangent step: ``(δh', δc')`` from the pre-activation tangents ``a`` (input
    part) and ``g`` (recurrent part), ``[b, kk, gH]`` or None for zero, and ``δh, δc``.
    """
    b, kk, H = shape
    if kind == "gru":
        s = None
        if a is not None:
            s = a * k["a"].unsqueeze(1)
        if g is not None:
            s = g * k["g"].unsqueeze(1) if s is None else s + g * k["g"].unsqueeze(1)
        out = s.view(b, kk, 3, H).sum(2) if s is not None else like.new_zeros(b, kk, H)
        if dh is not None:
            out = out + k["z"].unsqueeze(1) * dh
        return out, None
    p = a if g is None else (g if a is None else a + g)
    if kind == "lstm":
        if p is None:
            p = like.new_zeros(b, kk, 4 * H)
        dc_new = (p[..., : 3 * H] * k["ifg"].unsqueeze(1)).view(b, kk, 3, H).sum(2)
        if dc is not None:
            dc_new = dc_new + k["f"].unsqueeze(1) * dc
        return k["o"].unsqueeze(1) * p[..., 3 * H :] + k["beta"].unsqueeze(1) * dc_new, dc_new
    if p is None:
        return like.new_zeros(b, kk, H), None
    return k["d"].unsqueeze(1) * p, None


def _adjoint(kind, k, lam, lc):
    """One layer's adjoint step from the cotangent ``lam`` of its new hidden state (and ``lc`` of
    its new cell state): ``(μ_a, μ_g, direct part of λh, λc)`` where ``μ`` are the cotangents of
    the input and recurrent pre-activations (the same tensor except for the GRU); ``λh`` of the
    previous state is ``direct + μ_g W_hh``.
    """
    if kind == "gru":
        rep = lam.repeat(1, 1, 3)
        return rep * k["a"].unsqueeze(1), rep * k["g"].unsqueeze(1), k["z"].unsqueeze(1) * lam, None
    if kind == "lstm":
        total = lc + k["beta"].unsqueeze(1) * lam
        mu = torch.cat([total.repeat(1, 1, 3) * k["ifg"].unsqueeze(1), k["o"].unsqueeze(1) * lam], -1)
        return mu, mu, None, k["f"].unsqueeze(1) * total
    mu = k["d"].unsqueeze(1) * lam
    return mu, mu, None, None
