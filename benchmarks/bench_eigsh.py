"""Benchmark: top-10 eigenvalues of the sNTK, lanczos_ntk.eigsh against scipy's ARPACK.

Model ``CTRNN(64, 2, gain=1.5, seed=0)`` in float64, inputs ``[64, 50, 2]`` (``M = 204800``
states, ``P = 4288`` parameters). Each solver runs in its own subprocess so that the peak
resident memory (``ru_maxrss``) is its own; both work on the dual side ``G = Jᵀ J`` (the side
``lanczos_ntk.eigsh`` picks automatically, ``P < M``), scipy through ``G.to_scipy()``.

Run: ``python benchmarks/bench_eigsh.py [--threads N] [--block-sizes 1 4]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

K_EIG = 10
TOL = 1e-6


def _setup(threads: int):
    import torch

    import lanczos_ntk as lnk

    torch.set_num_threads(threads)
    model = lnk.models.CTRNN(64, 2, gain=1.5, seed=0).double()
    u = torch.randn(64, 50, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return torch, lnk, model, u


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child(which: str, threads: int, block_size: int) -> dict:
    torch, lnk, model, u = _setup(threads)
    K = lnk.StateNTK(model, u)
    G = K.dual()
    G.matmul(torch.zeros(G.shape[0], 1, dtype=torch.float64))  # build the linearisation once
    base = _peak_mib()
    out: dict = {"which": which, "M": K.shape[0], "P": G.shape[0], "setup_peak_mib": base}
    if which == "train_step":
        target = torch.zeros(64, 50, 64, dtype=torch.float64)
        times = []
        for _ in range(5):
            model.zero_grad()
            t = time.perf_counter()
            loss = ((model(u) - target) ** 2).mean()
            loss.backward()
            times.append(time.perf_counter() - t)
        out["seconds"] = sorted(times)[len(times) // 2]
        return out
    before = G.num_matvecs
    t = time.perf_counter()
    if which == "lanczos_ntk":
        r = lnk.eigsh(K, k=K_EIG, tol=TOL, block_size=block_size)
        vals = r.eigenvalues.tolist()
        out.update(
            side=r.side,
            status=r.status.value,
            restarts=r.num_restarts,
            calls=r.num_matmuls,
            block_size=block_size,
        )
    else:
        import numpy as np
        from scipy.sparse.linalg import eigsh as arpack

        vals = np.sort(arpack(G.to_scipy(), k=K_EIG, tol=TOL, return_eigenvectors=False))[::-1]
        vals = vals.tolist()
        out.update(side="dual")
    out["seconds"] = time.perf_counter() - t
    out["matvecs"] = G.num_matvecs - before
    out["peak_mib"] = _peak_mib()
    out["eigenvalues"] = vals
    return out


def run_child(which: str, threads: int, block_size: int = 1) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        which,
        "--threads",
        str(threads),
        "--block-sizes",
        str(block_size),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--child", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.block_sizes[0])))
        return
    step = run_child("train_step", args.threads)
    ref = run_child("scipy", args.threads)
    print(
        f"CTRNN(64, 2, gain=1.5) float64, inputs [64, 50, 2]: M = {step['M']}, "
        f"P = {step['P']}, torch threads = {args.threads}"
    )
    print(f"one training step (forward + MSE on all states + backward): {step['seconds'] * 1e3:.1f} ms")
    print(
        f"{'solver':<26}{'side':>6}{'time s':>9}{'steps':>8}{'matvecs':>9}{'calls':>7}"
        f"{'peak MiB':>10}{'max rel diff':>14}"
    )

    def row(name, r, diff):
        calls = r.get("calls", r["matvecs"])
        print(
            f"{name:<26}{r['side']:>6}{r['seconds']:>9.2f}{r['seconds'] / step['seconds']:>8.0f}"
            f"{r['matvecs']:>9}{calls:>7}{r['peak_mib']:>10.0f}{diff:>14.2e}"
        )

    row("scipy.sparse.linalg.eigsh", ref, 0.0)
    for b in args.block_sizes:
        r = run_child("lanczos_ntk", args.threads, b)
        diff = max(abs(a - c) / abs(c) for a, c in zip(r["eigenvalues"], ref["eigenvalues"]))
        row(f"lanczos_ntk.eigsh b={b}", r, diff)
        print(
            f"{'':<26}ratio time lanczos_ntk / scipy = {r['seconds'] / ref['seconds']:.2f}, "
            f"matvecs = {r['matvecs'] / ref['matvecs']:.2f}, status {r['status']}, "
            f"restarts {r['restarts']}"
        )
    print(f"(setup peak before solving: {ref['setup_peak_mib']:.0f} MiB; 'steps' = time in training steps)")
    print("top eigenvalues:", ", ".join(f"{v:.6g}" for v in ref["eigenvalues"]))


if __name__ == "__main__":
    main()
