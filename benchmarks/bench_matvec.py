"""Cost of one sNTK matvec relative to one training step, and peak memory.

CTRNN n=64, T=50, B=64 (M = 204,800 states, P = 4,288 parameters) by default. Every figure is
a ratio to the time of one training step (forward + MSE on all states + backward) measured in
the same run, median over repeats. Run: ``python benchmarks/bench_matvec.py [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch

import lanczos_ntk as lnk


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=2)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--jvp", default="auto")
    ap.add_argument("--chunk-size", type=int, default=None, help="trials per chunk")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--peak-of", choices=["train", "K", "G"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_of:
        return peak_of(args)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    model = lnk.models.CTRNN(args.n, args.inputs, gain=1.5, seed=0, dtype=dtype)
    u = torch.randn(args.B, args.T, args.inputs, generator=g, dtype=dtype)

    def train_step():
        model.zero_grad()
        h = model(u)
        loss = torch.nn.functional.mse_loss(h, torch.zeros_like(h))
        loss.backward()

    t_train = median_time(train_step, args.repeats)
    t0 = time.perf_counter()
    K = lnk.StateNTK(model, u, jvp=args.jvp, chunk_size=args.chunk_size)
    G = K.dual()
    v = torch.randn(K.shape[0], generator=g, dtype=dtype)
    x = torch.randn(G.shape[0], generator=g, dtype=dtype)
    K.mv(v)  # builds the cached linearisation
    t_setup = time.perf_counter() - t0
    V = torch.randn(K.shape[0], args.block, generator=g, dtype=dtype)
    X = torch.randn(G.shape[0], args.block, generator=g, dtype=dtype)
    rows = {
        "K matvec": median_time(lambda: K.mv(v), args.repeats),
        "G matvec": median_time(lambda: G.mv(x), args.repeats),
        f"K block of {args.block}, per vector": median_time(lambda: K.mv(V), args.repeats) / args.block,
        f"G block of {args.block}, per vector": median_time(lambda: G.mv(X), args.repeats) / args.block,
    }
    print(
        f"CTRNN n={args.n} T={args.T} B={args.B} {args.dtype}: M={K.shape[0]:,} P={G.shape[0]:,} "
        f"jvp={K.engine.jvp_mode} chunks={len(K.engine.chunks)} threads={torch.get_num_threads()}"
    )
    print(f"training step: {t_train * 1e3:.2f} ms (unit)")
    print(f"operator set-up incl. first matvec: {t_setup / t_train:.2f} training steps")
    for name, t in rows.items():
        print(f"{name:32s} {t * 1e3:8.2f} ms   ratio {t / t_train:.3f}")
    if not args.memory:
        return
    peaks = {}
    for what in ("train", "K", "G"):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--peak-of",
                what,
                "--dtype",
                args.dtype,
                "--n",
                str(args.n),
                "--T",
                str(args.T),
                "--B",
                str(args.B),
                "--inputs",
                str(args.inputs),
                "--jvp",
                args.jvp,
            ]
            + (["--chunk-size", str(args.chunk_size)] if args.chunk_size else []),
            capture_output=True,
            text=True,
            check=True,
        )
        peaks[what] = float(out.stdout.split()[-1])
    print(
        f"peak memory above the model and data (peak-RSS growth, separate processes): "
        f"training step {peaks['train']:.1f} MiB, K matvec {peaks['K']:.1f} MiB, "
        f"G matvec {peaks['G']:.1f} MiB; M-vector = {K.shape[0] * v.element_size() / 2**20:.2f} MiB"
    )


def peak_of(args):
    """Child process: max RSS growth (MiB) of one operation after model and data exist."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    model = lnk.models.CTRNN(args.n, args.inputs, gain=1.5, seed=0, dtype=dtype)
    u = torch.randn(args.B, args.T, args.inputs, generator=g, dtype=dtype)
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak-RSS mark (Linux)
        fh.write("5")
    base = _hwm()
    if args.peak_of == "train":
        h = model(u)
        torch.nn.functional.mse_loss(h, torch.zeros_like(h)).backward()
    else:
        K = lnk.StateNTK(model, u, jvp=args.jvp, chunk_size=args.chunk_size)
        op = K if args.peak_of == "K" else K.dual()
        op.mv(torch.randn(op.shape[0], generator=g, dtype=dtype))
    print((_hwm() - base) / 1024)


def _hwm() -> int:
    """Peak resident set size of this process since the last reset, in KiB."""
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM"))


if __name__ == "__main__":
    main()
