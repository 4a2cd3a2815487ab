"""Benchmark: lanczos_ntk against the peer pipelines (scipy + torch.func), side by side.

Every row builds one network, then times in this one process, on the same weights and data:

- **peer, per product**: scipy ``eigsh`` on ``G = Jᵀ J`` with ``torch.func.jvp`` / ``vjp`` run
  from scratch for every product;
- **peer, linearised**: the same, with the forward done once (``torch.func.linearize`` for
  ``J x`` and a retained autograd graph for ``Jᵀ v``);
- **lanczos_ntk**: ``StateNTK`` (operator construction included) and ``lanczos_ntk.eigsh``.

Rows: the built-in ``CTRNN`` (closed-form path), the same Euler CTRNN written as a plain
forward-only ``nn.Module`` (cell path, the step read off its loop), the same with a ``step``
method (cell path),
batch-first ``nn.GRU`` and ``nn.LSTM`` (cell path). Workload as in the issue: top-10
eigenvalues at ``tol=1e-6``, float32, gain 1.5.

Printed per row: top-10 time and speed-up over the best peer (with ``eigsh``'s default check for
missed eigenvalues after convergence, and without it: "unverif."; "products" counts both, then
the products scipy's ``eigsh`` asked the peer for), the
largest relative difference
to the peer's eigenvalues, ``K`` matvec and ``G`` matvec in training steps (forward + backward
of a squared loss on the states), the per-vector cost of a block of 10 against single products,
SLQ (10 probes × 40 steps) against ``linear_operator``'s ``lanczos_tridiag`` driven by the
linearised peer's ``G`` products (the SLQ a user of ``torch.func`` would run; its block product is
the faster of a loop over columns and one ``vmap``-batched call) and, as "same op", driven by
lanczos_ntk's own operator (the two Lanczos engines alone), and the peak resident memory of the row
above the process baseline (sampled).

Every top-10 pipeline runs ``--repeat`` times (default 2) and the fastest run is reported, so
first-call costs at a new size (allocations, kernel selection) count for nobody; products are
timed five times.

Run: ``python benchmarks/bench_peers.py [--size medium|large] [--rows ctrnn user_step ...]
[--scaling] [--repeat N]``. ``--scaling`` adds a table of time per product for B = 64, 256, 1024.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import re
import time
import warnings

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn
from torch.func import functional_call, jvp, linearize, vjp

import lanczos_ntk as lnk

SIZES = {"medium": (64, 50, 64), "large": (128, 100, 256)}  # n, T, B
D_IN, DT, GAIN, K_EIG, TOL = 2, 0.1, 1.5, 10, 1e-6


class ForwardOnly(nn.Module):
    """The Euler CTRNN as a user would write it: forward(u) loops over time, nothing else."""

    def __init__(self, W, B, b):
        super().__init__()
        self.W, self.B, self.b = (nn.Parameter(t.detach().clone()) for t in (W, B, b))

    def forward(self, u):
        h = torch.zeros(u.shape[0], self.W.shape[0], dtype=u.dtype, device=u.device)
        out = []
        for t in range(u.shape[1]):
            h = h + DT * (-h + torch.tanh(h) @ self.W.T + u[:, t] @ self.B.T + self.b)
            out.append(h)
        return torch.stack(out, 1)


class WithStep(ForwardOnly):
    """The same network with a documented one-step method."""

    def step(self, h, u):
        return h + DT * (-h + torch.tanh(h) @ self.W.T + u @ self.B.T + self.b)

    def forward(self, u):
        h = torch.zeros(u.shape[0], self.W.shape[0], dtype=u.dtype, device=u.device)
        out = []
        for t in range(u.shape[1]):
            h = self.step(h, u[:, t])
            out.append(h)
        return torch.stack(out, 1)


def build(row, n, T, B, dtype, device):
    g = torch.Generator().manual_seed(0)
    u = torch.randn(B, T, D_IN, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)
    ct = lnk.models.CTRNN(n, D_IN, gain=GAIN, dt=DT, seed=0, dtype=dtype).to(device)
    if row == "ctrnn":
        return ct, u
    if row == "user_forward":
        return ForwardOnly(ct.W, ct.U, ct.b), u
    if row == "user_step":
        return WithStep(ct.W, ct.U, ct.b), u
    torch.manual_seed(0)  # torch's RNN init uses the global generator
    cls = {"gru": nn.GRU, "lstm": nn.LSTM}[row]
    return cls(D_IN, n, batch_first=True, dtype=dtype, device=device), u


def states_fn(model):
    rnn = isinstance(model, (nn.RNN, nn.GRU, nn.LSTM))

    def f(params, u):
        out = functional_call(model, params, (u,))
        return out[0] if rnn else out

    return f


class PeakRSS:
    """Peak resident memory of the process while the block runs, above what it held on entry:
    the kernel's high-water mark (``VmHWM``), reset on entry through ``/proc/self/clear_refs``.
    No sampling thread: one would take the GIL from the timed Python loops (it slowed
    lanczos_ntk's top-10 by 7-10%). Freed heap memory is handed back to the system first
    (glibc's ``malloc_trim``), so that what an earlier pipeline freed does not hide this one's
    growth. ``nan`` where the mark cannot be reset (not Linux).
    """

    def __enter__(self):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass  # not glibc: the growth is counted from what the heap already holds
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None
        return self

    @staticmethod
    def _status(key):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def __exit__(self, *exc):
        self.peak = self._status("VmHWM") if self.base is not None else None

    @property
    def mib(self):
        return math.nan if self.base is None else (self.peak - self.base) / 2**20


def timed(fn, repeat=1):
    best = math.inf
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def scipy_top(matvec, P, dtype):
    """scipy's ``eigsh`` (ARPACK) on ``matvec``: ``(top-10 eigenvalues, products it asked for)``."""
    asked = [0]

    def mv(x):
        asked[0] += 1
        x = torch.as_tensor(np.asarray(x).reshape(P, -1), dtype=dtype)
        return matvec(x).double().numpy().reshape(np.asarray(x).shape[0], -1).squeeze(-1)

    op = LinearOperator((P, P), matvec=mv, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(P)
    top = np.sort(eigsh(op, k=K_EIG, which="LA", tol=TOL, v0=v0, return_eigenvectors=False))
    return top, asked[0]


def _tangents(params):
    """``x [P, k] -> {name: [k, *shape]}`` (contiguous) for the parameters ``params``."""
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def tangents(x):
        return {
            k: c.T.reshape(-1, *params[k].shape).contiguous() for k, c in zip(names, torch.split(x, sizes))
        }

    return tangents, sum(sizes)


def _flat(grads):
    """Gradients ``[k, *shape]`` by name -> ``[P, k]``."""
    return torch.cat([a.reshape(a.shape[0], -1) for a in grads], 1).T


def per_product_matvec(f, params, u):
    """``G x`` from scratch for every product (forward, ``J x``, ``Jᵀ`` of it)."""
    tangents, P = _tangents(params)

    def matvec(x):
        t = {k: c[0] for k, c in tangents(x).items()}
        out, back = vjp(lambda p: f(p, u), params)
        try:
            _, Jx = jvp(lambda p: f(p, u), (params,), (t,))
        except NotImplementedError:  # no forward mode (fused kernels): J x as a VJP of the VJP
            _, back2 = vjp(lambda w: back(w)[0], torch.zeros_like(out))
            (Jx,) = back2(t)
        (g,) = back(Jx)
        return _flat([g[k][None] for k in params])

    return matvec, P


def peer_per_product(f, params, u):
    matvec, P = per_product_matvec(f, params, u)
    return scipy_top(matvec, P, u.dtype)


def linearize_works(f, params, u):
    """Whether ``torch.func.linearize``'s function gives ``J x`` here, call after call: torch
    2.13's linearize of ``nn.GRU`` / ``nn.LSTM`` (CPU) is right on its first call only. Checked
    once per row, outside the timed pipelines."""
    tangents, P = _tangents(params)
    t = tangents(torch.randn(P, 1, generator=torch.Generator().manual_seed(3), dtype=u.dtype))
    t = {k: c[0] for k, c in t.items()}
    try:
        _, jvp_fn = linearize(lambda p: f(p, u), params)
        want = jvp(lambda p: f(p, u), (params,), (t,))[1]
    except NotImplementedError:  # no forward mode
        return False
    scale = 1e-4 * float(want.abs().max())
    return all(float((jvp_fn(t) - want).abs().max()) <= scale for _ in range(2))


class Linearised:
    """The peer's ``G`` products with the forward done once: ``torch.func.linearize`` for ``J x``
    where it works (:func:`linearize_works`), else a VJP of the retained graph's VJP, and the
    retained graph for ``Jᵀ``; for one column (:meth:`matvec`), a block column by column
    (:meth:`looped`) or a block in one batched call (:meth:`batched`: ``vmap`` of the linearised
    ``J``, or ``is_grads_batched`` through the double-backward graph, then a batched
    ``autograd.grad``).
    """

    def __init__(self, f, params, u, use_linearize):
        self.tangents, self.P = _tangents(params)
        self.names = list(params)
        self.leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.out = f(self.leaves, u)
        self.jvp_fn = linearize(lambda p: f(p, u), params)[1] if use_linearize else None
        if self.jvp_fn is None:
            self.w = torch.zeros_like(self.out, requires_grad=True)
            self.gw = torch.autograd.grad(self.out, self._leaves(), self.w, create_graph=True)

    def _leaves(self):
        return [self.leaves[k] for k in self.names]

    def _jx(self, t, batched=False):
        if self.jvp_fn is not None:
            return torch.func.vmap(self.jvp_fn)(t) if batched else self.jvp_fn(t)
        ts = [t[k] for k in self.names]
        return torch.autograd.grad(self.gw, self.w, ts, retain_graph=True, is_grads_batched=batched)[0]

    def _back(self, Jx, batched=False):
        g = torch.autograd.grad(self.out, self._leaves(), Jx, retain_graph=True, is_grads_batched=batched)
        return _flat(g if batched else [a[None] for a in g])

    def matvec(self, x):
        return self._back(self._jx({k: c[0] for k, c in self.tangents(x).items()}))

    def looped(self, X):
        return torch.cat([self.matvec(X[:, j : j + 1]) for j in range(X.shape[1])], 1)

    def batched(self, X):
        return self._back(self._jx(self.tangents(X), batched=True), batched=True)


def peer_linearised(f, params, u, use_linearize):
    lin = Linearised(f, params, u, use_linearize)
    return scipy_top(lin.matvec, lin.P, u.dtype)


def peer_block_forms(f, params, u, use_linearize):
    """``G X`` for a block of columns as a user of ``torch.func`` would write it:
    ``{form: build}``, ``build()`` returning the product function: the linearised products
    column by column or batched (:class:`Linearised`), and a batched call from scratch (``J X``
    by ``vmap`` of forward-mode ``jvp``, ``Jᵀ`` through the retained graph as in the others).
    """

    def scratch_batched():
        lin = Linearised(f, params, u, use_linearize)  # its retained graph for Jᵀ

        def fn(X):
            Jx = torch.func.vmap(lambda t: jvp(lambda p: f(p, u), (params,), (t,))[1])(lin.tangents(X))
            return lin._back(Jx, batched=True)

        return fn

    return {
        "looped": lambda: Linearised(f, params, u, use_linearize).looped,
        "batched": lambda: Linearised(f, params, u, use_linearize).batched,
        "batched from scratch": scratch_batched,
    }


def peer_slq(f, params, u, dtype, use_linearize):
    """linear_operator's SLQ on the peer's fastest block product: ``(form, (seconds, products, T))``.

    Every form is checked against products from scratch (and dropped when it disagrees or
    fails) and timed on one block of 10; the fastest runs the SLQ. None when no form works.
    """
    per_product, P = per_product_matvec(f, params, u)
    X = torch.randn(P, 10, generator=torch.Generator().manual_seed(2), dtype=dtype)
    want = torch.cat([per_product(X[:, j : j + 1]) for j in range(3)], 1)
    times = {}
    for name, build in peer_block_forms(f, params, u, use_linearize).items():
        try:
            fn = build()
            got = fn(X)[:, :3]
        except Exception:  # noqa: BLE001 -- a model torch.func cannot batch
            continue
        if float((got - want).abs().max()) <= 1e-3 * float(want.abs().max()):
            times[name] = (timed(lambda fn=fn: fn(X), repeat=2)[0], fn)
    if not times:
        return None
    name = min(times, key=lambda n: times[n][0])
    return name, lo_slq_seconds(times[name][1], P, 10, 40, dtype)


def train_step_seconds(model, u, f):
    params = {k: v.detach().clone().requires_grad_(True) for k, v in model.named_parameters()}

    def step():
        loss = (f(params, u) ** 2).mean()
        torch.autograd.grad(loss, list(params.values()))

    step()
    return timed(step, repeat=3)[0]


def lo_slq_seconds(matmul, n, num_probes, num_steps, dtype):
    """``linear_operator``'s SLQ driven by ``matmul``: seconds, products asked, the ``T`` matrices."""
    from linear_operator.utils.lanczos import lanczos_tridiag

    probes = torch.randint(0, 2, (n, num_probes), generator=torch.Generator().manual_seed(0))
    probes = (2 * probes - 1).to(dtype)

    calls = [0]

    def counted(X):
        calls[0] += X.shape[-1]
        return matmul(X)

    def run():
        _, T = lanczos_tridiag(
            counted,
            num_steps,
            dtype=dtype,
            device=probes.device,
            matrix_shape=torch.Size([n, n]),
            init_vecs=probes,
            num_init_vecs=num_probes,
        )
        torch.linalg.eigh(T)
        return T

    t, T = timed(run)
    return t, calls[0], T


def row_figures(row, n, T, B, dtype, skip_peers=False, skip_slq=False, repeat=2):
    model, u = build(row, n, T, B, dtype, "cpu")
    f = states_fn(model)
    params = {k: v.detach() for k, v in model.named_parameters()}
    fig = {"row": row}
    with PeakRSS() as mem:
        t_ours, res = timed(
            lambda: lnk.eigsh(
                lnk.StateNTK(model, u), k=K_EIG, tol=TOL, generator=torch.Generator().manual_seed(0)
            ),
            repeat,
        )
    fig["ours_s"], fig["ours_mib"] = t_ours, mem.mib
    fig["ours_products"] = res.num_matvecs
    # the same without the check for missed eigenvalues after convergence (ARPACK has none)
    t_plain, plain = timed(
        lambda: lnk.eigsh(
            lnk.StateNTK(model, u), k=K_EIG, tol=TOL, generator=torch.Generator().manual_seed(0), verify=False
        ),
        repeat,
    )
    fig["plain_s"], fig["plain_products"] = t_plain, plain.num_matvecs
    ours = np.sort(res.eigenvalues.double().numpy())
    lin_ok = fig["linearize"] = not skip_peers and linearize_works(f, params, u)
    if not skip_peers:
        t1, (ref, fig["peer_products"]) = timed(lambda: peer_per_product(f, params, u), repeat)
        with PeakRSS() as mem:
            t2, (ref2, _) = timed(lambda: peer_linearised(f, params, u, lin_ok), repeat)
        fig["peer_mib"] = mem.mib
        fig["peer_s"] = min(t1, t2)
        fig["peer_which"] = "per-product" if t1 <= t2 else "linearised"
        # against both peers (each computed its own eigenvalues)
        fig["agree"] = max(float(np.max(np.abs(ours - r) / np.abs(r))) for r in (ref, ref2))
    K = lnk.StateNTK(model, u)
    fig["plan"] = str(K.plan)
    G = K.dual()
    gtor = torch.Generator().manual_seed(1)
    v = torch.randn(K.shape[0], 1, generator=gtor, dtype=dtype)
    V = torch.randn(K.shape[0], 10, generator=gtor, dtype=dtype)
    x = torch.randn(G.shape[0], 1, generator=gtor, dtype=dtype)
    K.matmul(v)  # build the linearisation (once per operator)
    step = train_step_seconds(model, u, f)
    t_k = timed(lambda: K.matmul(v), repeat=5)[0]
    t_g = timed(lambda: G.matmul(x), repeat=5)[0]
    t_block = timed(lambda: K.matmul(V), repeat=5)[0]
    fig.update(
        train_step_s=step, k_over_step=t_k / step, g_over_step=t_g / step, block_per_vector=t_block / 10 / t_k
    )
    if not skip_slq:
        side = G if G.shape[0] < K.shape[0] else K
        t_slq = timed(
            lambda: lnk.slq(side, num_probes=10, num_steps=40, generator=torch.Generator().manual_seed(0))
        )[0]
        t_lo, n_lo, T_ours = lo_slq_seconds(side.matmul, side.shape[0], 10, 40, dtype)
        fig["slq_same"], fig["slq_lo_products"] = t_lo / t_slq, n_lo
        peer = (
            peer_slq(f, params, u, dtype, lin_ok) if not skip_peers and side is G else None
        )  # the peer's is G
        if peer is not None:
            which, (t_peer, _, T_peer) = peer
            fig["slq_peer"], fig["slq_peer_which"] = t_peer / t_slq, which
            # same probes, same operator: the first Lanczos coefficients agree to rounding
            a_ours, a_peer = T_ours[..., 0, 0].double(), T_peer[..., 0, 0].double()
            fig["slq_agree"] = float(((a_ours - a_peer).abs() / a_peer.abs()).max())
    return fig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="medium")
    ap.add_argument("--rows", nargs="+", default=["ctrnn", "user_forward", "user_step", "gru", "lstm"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-slq", action="store_true")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="top-10 runs per pipeline (ours and the peers); the fastest is reported",
    )
    ap.add_argument("--scaling", action="store_true", help="time per product for B = 64, 256, 1024")
    args = ap.parse_args()
    # torch.func.linearize (the linearised peer) warns about its constant folding on every call
    warnings.filterwarnings("ignore", message="Attempted to insert a get_attr Node")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    n, T, B = SIZES[args.size]
    print(
        f"size {args.size}: n={n} T={T} B={B} M={B * T * n:,} {args.dtype} "
        f"threads={args.threads} torch {torch.__version__}"
    )
    head = (
        f"{'row':13s} {'top-10 s':>9s} {'peer s':>8s} {'speed-up':>8s} {'unverif.':>8s} "
        f"{'products':>13s} {'agree':>8s} "
        f"{'K/step':>7s} {'G/step':>7s} {'blk/vec':>7s} {'SLQ x':>6s} {'same op':>7s} "
        f"{'MiB':>7s} {'peer MiB':>8s}"
    )
    print(head)
    for row in args.rows:  # one-time costs of the process (lazy imports, autodiff rules)
        row_figures(row, 8, 5, 4, dtype, args.skip_peers, args.skip_slq)
    plans, slq_notes = [], []
    for row in args.rows:
        fg = row_figures(row, n, T, B, dtype, args.skip_peers, args.skip_slq, args.repeat)
        if "slq_peer" in fg:
            slq_notes.append(
                f"{row}: peer {fg['slq_peer_which']}, {fg['slq_lo_products']} products, "
                f"T[0,0] agree {fg['slq_agree']:.1e}"
            )
        how = "torch.func.linearize" if fg["linearize"] else "a VJP of the retained graph's VJP"
        plans.append(
            f"  {row}: {fg['plan']}" + ("" if args.skip_peers else f"; linearised peer's J x: {how}")
        )
        peer = fg.get("peer_s", float("nan"))
        print(
            f"{row:13s} {fg['ours_s']:9.3f} {peer:8.3f} {peer / fg['ours_s']:7.2f}x "
            f"{peer / fg['plain_s']:7.2f}x {fg['ours_products']:4d}/{fg['plain_products']}/"
            f"{fg.get('peer_products', '-')!s:<4s} "
            f"{fg.get('agree', float('nan')):8.1e} {fg['k_over_step']:7.2f} {fg['g_over_step']:7.2f} "
            f"{fg['block_per_vector']:7.2f} {fg.get('slq_peer', float('nan')):5.2f}x "
            f"{fg.get('slq_same', float('nan')):6.2f}x "
            f"{fg['ours_mib']:7.0f} {fg.get('peer_mib', float('nan')):8.0f}",
            flush=True,
        )
    if not args.skip_slq:
        print(
            "SLQ x: linear_operator's SLQ (lanczos_tridiag, the probes as one block) on the linearised "
            "peer's G products, over lanczos_ntk.slq; same op: linear_operator's SLQ on lanczos_ntk's "
            "own operator (its engine against ours; the products are the same). Both 10 probes x 40 "
            "steps (lanczos_ntk: 400 products). " + "; ".join(slq_notes)
        )
    print("plans:")
    print("\n".join(plans))
    if args.scaling:
        print("scaling (K matvec, one vector):")
        for row in args.rows:
            for b in (64, 256, 1024):
                model, u = build(row, n, T, b, dtype, "cpu")
                with PeakRSS() as mem:
                    K = lnk.StateNTK(model, u)
                    v = torch.ones(K.shape[0], 1, dtype=dtype)
                    K.matmul(v)
                    t = timed(lambda K=K, v=v: K.matmul(v), repeat=2)[0]
                print(
                    f"  {row:13s} B={b:5d} M={K.shape[0]:>10,} {t * 1e3:9.1f} ms "
                    f"{t * 1e3 / b:7.3f} ms/trial  peak {mem.mib:7.0f} MiB "
                    f"(budget {K.plan.budget_bytes / 2**20:,.0f} MiB, {K.plan.num_chunks} chunk(s))",
                    flush=True,
                )


if __name__ == "__main__":
    main()
