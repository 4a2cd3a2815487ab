"""Overhead of the kernel tracker over plain training, measured in one run.

A CTRNN (n=64 units, T=50 steps, B=64 trials by default) is trained by SGD on random targets
for ``--steps`` steps, first alone, then with a :class:`lanczos_ntk.track.KernelTracker`
recording every ``every`` steps (each value of ``--every``). Printed: the time of a plain
training step, the time of one record and its products, and the overhead
``(training + recording) / training``. Run: ``python benchmarks/bench_track.py``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

import lanczos_ntk as lnk


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--T", type=int, default=50)
    ap.add_argument("--B", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", default="10,50,200", help="comma-separated record intervals")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(args.B, args.T, 1, generator=g, dtype=torch.float64)
    target = 0.5 * torch.randn(args.B, args.T, args.n, generator=g, dtype=torch.float64)

    def train(every):
        model = lnk.models.CTRNN(args.n, 1, gain=0.8, seed=0)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        tracker = None if every is None else lnk.track.KernelTracker(model, u, every=every)
        t_train = 0.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for step in range(args.steps):
                t0 = time.perf_counter()
                opt.zero_grad()
                loss = ((model(u) - target) ** 2).mean()
                t_train += time.perf_counter() - t0
                if tracker is not None:
                    tracker.step(step, loss)
                t0 = time.perf_counter()
                loss.backward()
                opt.step()
                t_train += time.perf_counter() - t0
        return t_train, tracker

    t_plain, _ = train(None)
    step_ms = 1e3 * t_plain / args.steps
    M, P = args.B * args.T * args.n, args.n * args.n + 2 * args.n
    print(
        f"CTRNN n={args.n}, T={args.T}, B={args.B} (M = {M:,}, P = {P:,}), float64, "
        f"{args.threads} thread(s); {args.steps} SGD steps: {step_ms:.1f} ms per step"
    )
    print(
        f"{'every':>6} {'records':>7} {'s/record':>9} {'products/record':>16} "
        f"{'record / step':>13} {'overhead':>9}"
    )
    for every in [int(e) for e in args.every.split(",")]:
        t_train, tracker = train(every)
        rec = tracker.records
        n = len(rec.steps)
        per = rec.seconds / n
        print(
            f"{every:>6} {n:>7} {per:>9.2f} {rec.num_matvecs / n:>16.0f} "
            f"{1e3 * per / step_ms:>13.0f} {(t_plain + rec.seconds) / t_plain:>8.2f}x"
        )


if __name__ == "__main__":
    main()
