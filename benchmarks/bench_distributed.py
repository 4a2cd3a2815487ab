"""One sNTK spectrum on 1 and on N gloo processes: time per product, bytes all-reduced per
product, and the compute / communication split.

Each process holds its contiguous share of the trials (``StateNTK(..., process_group=...)``),
so a product of ``G = JᵀJ`` is a local ``Jᵀ(J x)`` over that share plus one all-reduce of the
``P``-sized result. Printed per process count: the median time of a ``G`` product (block of 1
and of ``--block``), the time of the all-reduce alone on a ``P``-vector (the communication
part), the top-``k`` solve and the speed-up over one process, all measured in this run.
Run: ``python benchmarks/bench_distributed.py [--procs 1,2] [--B 64 --T 50 --n 64]``.
The cost model is in ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lanczos_ntk as lnk


def _median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _rank(rank, world, port, args, folder):
    torch.set_num_threads(args.threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    dtype = getattr(torch, args.dtype)
    model = lnk.models.CTRNN(args.n, args.inputs, gain=1.5, seed=0, dtype=dtype)
    u = torch.randn(args.B, args.T, args.inputs, generator=torch.Generator().manual_seed(0), dtype=dtype)
    lo, hi = rank * args.B // world, (rank + 1) * args.B // world
    group = dist.group.WORLD if world > 1 else None
    K = lnk.StateNTK(model, u[lo:hi], process_group=group)
    G = K.dual()
    P = G.shape[0]
    x1 = torch.randn(P, 1, generator=torch.Generator().manual_seed(1), dtype=dtype)
    xb = torch.randn(P, args.block, generator=torch.Generator().manual_seed(2), dtype=dtype)

    def sync():
        if world > 1:
            dist.barrier()

    def timed(fn):
        def run():
            sync()
            fn()

        return _median(run, args.repeats)

    t1 = timed(lambda: G.matmul(x1))
    tb = timed(lambda: G.matmul(xb)) / args.block
    v = torch.randn(P, dtype=dtype)
    t_ar = timed(lambda: dist.all_reduce(v)) if world > 1 else 0.0
    t_barrier = timed(lambda: None) if world > 1 else 0.0
    sync()
    t = time.perf_counter()
    top = lnk.eigsh(K, k=args.k, tol=args.tol, generator=torch.Generator().manual_seed(0))
    sync()
    t_top = time.perf_counter() - t
    if rank == 0:
        torch.save(
            {
                "P": P,
                "M": K.total_states,
                "t1": t1,
                "tb": tb,
                "t_ar": t_ar,
                "t_barrier": t_barrier,
                "t_top": t_top,
                "products": top.num_matvecs,
                "eigenvalues": top.eigenvalues,
                "itemsize": x1.element_size(),
            },
            os.path.join(folder, f"world{world}.pt"),
        )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        os._exit(0)  # results saved; skip gloo's teardown at interpreter exit


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=2)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--block", type=int, default=10)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tol", type=float, default=1e-8)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for world in procs:
            if world == 1:
                _rank(0, 1, 0, args, folder)
            else:
                mp.spawn(_rank, args=(world, _free_port(), args, folder), nprocs=world, join=True)
            rows[world] = torch.load(os.path.join(folder, f"world{world}.pt"), weights_only=True)
    first = rows[procs[0]]
    print(
        f"CTRNN n={args.n}, T={args.T}, B={args.B}: M = {first['M']:,} states, "
        f"P = {first['P']:,} parameters, {args.dtype}, {args.threads} thread(s) per process; "
        f"top-{args.k} at tol {args.tol:g}"
    )
    print(
        f"all-reduce per product: P x {first['itemsize']} bytes = "
        f"{first['P'] * first['itemsize'] / 1024:.1f} KiB per vector"
    )
    head = (
        f"{'procs':>5} {'G x (ms)':>9} {'per vec, block (ms)':>20} {'all-reduce (ms)':>16} "
        f"{'comm share':>10} {'top-k (s)':>9} {'products':>8} {'speed-up':>8} "
        f"{'max |Δλ|/λ':>11}"
    )
    print(head)
    for world, r in rows.items():
        share = r["t_ar"] / r["t1"] if r["t1"] > 0 else 0.0
        dl = float(((r["eigenvalues"] - first["eigenvalues"]).abs() / first["eigenvalues"].abs()).max())
        print(
            f"{world:>5} {1e3 * r['t1']:>9.2f} {1e3 * r['tb']:>20.2f} {1e3 * r['t_ar']:>16.3f} "
            f"{share:>10.1%} {r['t_top']:>9.2f} {r['products']:>8} "
            f"{first['t_top'] / r['t_top']:>7.2f}x {dl:>11.1e}"
        )


if __name__ == "__main__":
    main()
