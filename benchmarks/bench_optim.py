"""Wall-clock cost per training step of the low-rank natural gradient (LRNG) relative to SGD.

The student–teacher problem of :mod:`lanczos_ntk.experiments.teacher` (CTRNN n=8, B=16, T=40, P=80) by
default, trained at ``--lr`` for ``--steps`` steps per optimizer. A step is zero_grad +
forward + MSE + backward + update; LRNG's eigenpair refreshes (every ``refresh_every`` steps,
warm-started) are included, so the figure is the amortised overhead. Optimizers are timed in
turns, ``--repeats`` times; the median per-step wall-clock time of each is reported, and the
overhead in process CPU time next to it (less sensitive to other jobs on a shared machine).

Variants: ``lrng/r{R}`` is :class:`~lanczos_ntk.optim.LowRankNaturalGradient` with
``refresh_every=R`` and its default tracked refreshes (one block product of ``G`` per refresh
after the first Lanczos solve); ``lrng-lanczos/r{R}`` solves with Lanczos at every refresh.

Run: ``python benchmarks/bench_optim.py [--threads 1] [--n 8 --B 16 --T 40]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import torch

from lanczos_ntk.experiments import teacher as T
from lanczos_ntk.optim import LowRankNaturalGradient


def time_run(cfg, make_opt, steps):
    prob = T.build_problem(cfg)
    model, u, target = prob.student, prob.inputs, prob.targets
    opt = make_opt(model, u)
    t, c = time.perf_counter(), time.process_time()
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(u) - target) ** 2).mean()
        loss.backward()
        opt.step()
    per = (time.perf_counter() - t) / steps
    cpu = (time.process_time() - c) / steps
    return per, cpu, float(loss.detach()), getattr(opt, "num_matvecs", 0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=40)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--refresh", type=int, nargs="+", default=[10, 20, 50])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dataclasses.replace(T.TeacherConfig(), state_size=args.n, trials=args.B, trial_steps=args.T)
    gen = torch.Generator

    def lrng(mode, r):
        return lambda m, u: LowRankNaturalGradient(
            m, u, lr=args.lr, rank=args.rank, refresh_every=r, refresh=mode, generator=gen().manual_seed(0)
        )

    variants = {"sgd": lambda m, u: torch.optim.SGD(m.parameters(), lr=args.lr)}
    for r in args.refresh:
        variants[f"lrng/r{r}"] = lrng("track", r)
        variants[f"lrng-lanczos/r{r}"] = lrng("lanczos", r)
    times = {k: [] for k in variants}
    cpus = {k: [] for k in variants}
    info = {}
    for make in variants.values():  # warm-up
        time_run(cfg, make, 3)
    for _ in range(args.repeats):
        for name, make in variants.items():
            per, cpu, loss, mv = time_run(cfg, make, args.steps)
            times[name].append(per)
            cpus[name].append(cpu)
            info[name] = {"final_loss": loss, "matvecs": mv}
    sgd = statistics.median(times["sgd"])
    sgd_cpu = statistics.median(cpus["sgd"])
    out = {
        name: {
            "ms_per_step": 1e3 * statistics.median(ts),
            "overhead": statistics.median(ts) / sgd,
            "cpu_overhead": statistics.median(cpus[name]) / sgd_cpu,
            **info[name],
        }
        for name, ts in times.items()
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(
        f"CTRNN n={args.n} B={args.B} T={args.T} P={args.n * args.n + 2 * args.n}, "
        f"lr={args.lr}, {args.steps} steps x {args.repeats} repeats, {args.threads} thread(s)"
    )
    print(f"{'optimizer':<18}{'ms/step':>10}{'overhead':>10}{'(cpu)':>8}{'G-products':>12}{'final loss':>12}")
    for name, row in out.items():
        print(
            f"{name:<18}{row['ms_per_step']:>10.2f}{row['overhead']:>9.2f}x"
            f"{row['cpu_overhead']:>7.2f}x{row['matvecs']:>12d}{row['final_loss']:>12.3e}"
        )


if __name__ == "__main__":
    main()
