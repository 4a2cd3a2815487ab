"""GPU check: the large peer-benchmark case and one with about 10⁸ states, on a CUDA device.

Prints, per case: the operator's plan (path, chunks, cached bytes, budget), the time of the
first product (building the linearisation), the time per ``K`` matvec, per vector in a block
of 10, a training step of the same model, the top-10 eigenvalues' time, and the peak GPU memory
(``torch.cuda.max_memory_allocated``) against the budget. Products are timed with
``torch.cuda.synchronize`` around them only, so a host-device sync inside the product loop
shows up as lost throughput, not as a hidden cost.

Run: ``python benchmarks/gpu_check.py [--dtype float32] [--huge-trials 8192]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_peers as bp  # noqa: E402

import lanczos_ntk as lnk  # noqa: E402


def sync():
    torch.cuda.synchronize()


def timed(fn, repeat=3):
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def case(label, row, n, T, B, dtype, eig=True):
    torch.cuda.reset_peak_memory_stats()
    model, u = bp.build(row, n, T, B, dtype, "cuda")
    t = time.perf_counter()
    K = lnk.StateNTK(model, u)
    v = torch.randn(K.shape[0], 1, dtype=dtype, device="cuda")
    K.matmul(v)
    sync()
    first = time.perf_counter() - t
    t_mv = timed(lambda: K.matmul(v))
    V = torch.randn(K.shape[0], 10, dtype=dtype, device="cuda")
    t_blk = timed(lambda: K.matmul(V), repeat=2) / 10
    f = bp.states_fn(model)
    params = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    step = timed(lambda: torch.autograd.grad((f(params, u) ** 2).mean(), list(params.values())))
    top = float("nan")
    if eig:
        t = time.perf_counter()
        lnk.eigsh(K, k=10, tol=1e-6, generator=torch.Generator().manual_seed(0))
        sync()
        top = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(
        f"{label}: M={K.shape[0]:,} P={K.dual().shape[0]:,}\n  plan: {K.plan}\n"
        f"  first product {first:.2f} s, K matvec {t_mv * 1e3:.1f} ms "
        f"({t_mv / step:.2f} training steps), block of 10 {t_blk * 1e3:.1f} ms/vector "
        f"({t_blk / t_mv:.2f} of single), top-10 {top:.2f} s, peak {peak:.2f} GiB "
        f"(budget {K.plan.budget_bytes / 2**30:.1f} GiB)",
        flush=True,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--huge-trials", type=int, default=8192, help="B of the ~1e8-state case")
    ap.add_argument("--rows", nargs="+", default=["ctrnn", "user_forward", "user_step", "gru", "lstm"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here")
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} {args.dtype}")
    n, T, B = bp.SIZES["large"]
    for row in args.rows:
        case(f"large {row}", row, n, T, B, dtype)
    # about 1e8 states: n=128, T=100, B=8192 -> M = 104,857,600
    for row in ("ctrnn", "user_step", "user_forward"):
        case(f"huge {row}", row, n, T, args.huge_trials, dtype, eig=False)


if __name__ == "__main__":
    main()
