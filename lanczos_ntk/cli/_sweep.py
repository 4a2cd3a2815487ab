"""The ``sweep`` and ``demo`` commands: spectral metrics and fixed points along a parameter."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import cast

import click
import numpy as np
import torch

from ..experiments.sweep import (
    SweepPoint,
    check_param,
    collect_sweep,
    constant_input,
    continue_branch,
    critical_gain,
    density_of,
    dynamics_at,
    euler_line,
    model_at,
    spectral_summary,
)
from ._app import (
    RANK_LEGEND,
    check_spectrum_cfg,
    common_options,
    friendly,
    inputs_option,
    launch_for,
    main,
    make_operator,
    model_and_inputs,
    progress,
    report,
    resolve_config,
    run_folder,
    save_figures,
)
from ._runs import ConfigError, load_state_dict, parse_list

__all__ = ["demo", "sweep"]


def _plan(cfg: dict, model) -> tuple[list[float], list[str], list, float]:
    """Swept values, their labels, checkpoint states (or Nones) and the predicted critical gain."""
    s = cfg["sweep"]
    param = s["param"]
    try:
        check_param(model, param)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    gc = critical_gain(model) if param == "gain" else math.nan
    if param == "checkpoints":
        if not s["checkpoints"]:
            raise ConfigError("sweep.param = 'checkpoints' needs files: --checkpoints a.pt b.pt ...")
        states = [load_state_dict(p, model) for p in s["checkpoints"]]
        return (
            list(map(float, range(len(states)))),
            [Path(p).name for p in s["checkpoints"]],
            states,
            math.nan,
        )
    if s["checkpoints"]:
        raise ConfigError(
            f"sweep.checkpoints given but sweep.param = {param!r}; use sweep.param = 'checkpoints'"
        )
    if s["values"]:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s["values"]):
            raise ConfigError(f"sweep.values must be numbers, got {s['values']!r}")
        values = [float(v) for v in s["values"]]
    else:
        if s["num"] < 1:
            raise ConfigError(f"sweep.num must be >= 1, got {s['num']}")
        values = np.linspace(s["start"], s["stop"], s["num"]).tolist()
    if s["relative_to_critical"]:
        if param != "gain" or not math.isfinite(gc):
            raise ConfigError(
                "sweep.relative_to_critical needs sweep.param = 'gain' and a model "
                "whose trivial fixed point loses stability with the gain"
            )
        values = [v * gc for v in values]
    return values, [f"{param}={v:.4g}" for v in values], [None] * len(values), gc


def _fixed_point_text(signature) -> str:
    """``[0, 0, 1]`` for the log: how many fixed points, how many stable, and what the list is."""
    if not signature:
        return "no fixed point found"
    stable = sum(1 for c in signature if c == 0)
    return (
        f"{len(signature)} fixed point(s), {stable} stable (unstable eigenvalues per point: "
        f"{list(signature)})"
    )


def _density_indices(n: int, wanted: int, values, bifurcations) -> list[int]:
    """Which sweep points get a density: the ends, the one nearest the bifurcation, then evenly."""
    if wanted <= 0 or n == 0:
        return []
    located = [b for b in bifurcations if b["kind"] != "stability_change"] or list(bifurcations)
    order = [0, n - 1]
    order += [int(np.argmin(np.abs(np.asarray(values) - b["p"]))) for b in located[:1]]
    order += [int(j) for j in np.linspace(0, n - 1, max(wanted, 2)).round()]
    chosen: list[int] = []
    for j in order:
        if j not in chosen:
            chosen.append(j)
    return sorted(chosen[:wanted])


def run_sweep(command: str, cfg: dict, out, fresh: bool, quiet: bool, title: str = ""):
    """Validate, then compute (or load) every sweep point, the branch, the figures."""
    check_spectrum_cfg(cfg)
    model, inputs = model_and_inputs(cfg)
    assert inputs is not None  # the sweep and demo defaults always have an [inputs] table
    values, labels, states, gc = _plan(cfg, model)
    dyn = cfg["dynamics"]
    has_rhs = hasattr(model, "rhs") and hasattr(model, "kind")
    try:
        u_const = constant_input(inputs, dyn["input"], launch_for(cfg).group) if has_rhs else None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    param = cfg["sweep"]["param"]
    make_operator(model, inputs, cfg)  # validates outputs / model before anything is written
    t_start = time.perf_counter()
    with run_folder(command, cfg, out, fresh, quiet) as folder:
        points = []
        computed = 0
        with progress(quiet, total=len(values), desc=f"{command}: {param}") as bar:
            for i, (value, label, state) in enumerate(zip(values, labels, states)):
                name = f"point-{i:03d}"
                if folder.has(name):
                    points.append(folder.load(name))
                    folder.log(f"{name} ({label}): loaded from the previous run")
                    bar.update()
                    continue
                t0 = time.perf_counter()
                m = model_at(model, param, value, state=state)
                u = inputs * value if param == "input" else inputs
                K = make_operator(m, u, cfg)
                gen = torch.Generator().manual_seed(cfg["seed"])
                summary = spectral_summary(K, cfg["spectrum"], gen)
                fp, leading, signature = None, math.nan, []
                if has_rhs and dyn["fixed_points"]:
                    assert u_const is not None  # set whenever has_rhs
                    uc = u_const * value if param == "input" else u_const
                    fp, leading, signature = dynamics_at(m, uc, dyn, gen)
                point = SweepPoint(
                    index=i,
                    value=float(value),
                    label=label,
                    spectrum=summary,
                    fixed_points=fp,
                    leading=leading,
                    signature=signature,
                    seconds=time.perf_counter() - t0,
                )
                folder.save(name, point)
                computed += 1
                folder.log(
                    f"{name} ({label}): computed in {point.seconds:.2f} s, "
                    f"lambda_max={float(summary.top.eigenvalues[0]):.4g}, "
                    f"participation={summary.participation.value:.4g}, "
                    f"{_fixed_point_text(signature)}"
                )
                points.append(point)
                bar.update()
        branch = None
        if has_rhs and dyn["continuation"] and param != "checkpoints" and len(values) > 1:
            if folder.has("branch"):
                branch = folder.load("branch")
                folder.log("branch: loaded from the previous run")
            else:
                assert u_const is not None  # set whenever has_rhs
                fp0 = points[0].fixed_points
                x0 = (
                    fp0.points[int(fp0.points.norm(dim=1).argmin())]
                    if fp0 is not None and len(fp0)
                    else torch.zeros(cast(int, model.state_size), dtype=torch.float64)
                )
                lo, hi = min(values), max(values)
                with progress(quiet, total=1, desc="continuation") as bar:
                    try:
                        branch = continue_branch(
                            model,
                            param,
                            x0,
                            values[0],
                            (lo, hi),
                            u_const,
                            dyn["max_steps"],
                            direction=1 if values[-1] >= values[0] else -1,
                        )
                        folder.save("branch", branch)
                        folder.log(
                            f"branch: {len(branch)} points, {branch.status.value}, "
                            f"bifurcations {[(b.kind, round(b.p, 6)) for b in branch.bifurcations]}"
                        )
                    except (RuntimeError, ValueError) as exc:
                        folder.log(f"branch: continuation failed: {exc}")
                    bar.update()
        result = collect_sweep(param, points, branch, gc)
        folder.save("sweep", result)
        d_idx = _density_indices(len(points), cfg["sweep"]["densities"], values, result.bifurcations)
        densities = [(points[j].label, density_of(points[j].spectrum, cfg["density"])) for j in d_idx]
        for j, (_, d) in zip(d_idx, densities):
            folder.save(f"density-{j:03d}", d)
        folder.write_json("summary.json", _summary(result, points))
        figs = save_figures(folder, _figures(result, points, densities, title))
        wall = time.perf_counter() - t_start
        folder.log(f"{command}: {computed} point(s) computed, {len(points) - computed} loaded, {wall:.1f} s")
    return folder, result, points, figs, computed, wall


def _figures(result, points, densities, title):
    from ..plotting import sweep_figures

    return sweep_figures(result, points, densities, title=title)


def _summary(result, points) -> dict:
    return {
        "param": result.param,
        "critical_value": result.critical_value,
        "bifurcations": result.bifurcations,
        "euler_map": euler_line([result.branch], result.param)[0],
        "points": [
            {
                "value": p.value,
                "label": p.label,
                "leading": p.leading,
                "fixed_point_signature": p.signature,
                **p.spectrum.metrics(),
            }
            for p in points
        ],
    }


def _lines(folder, result, points, figs, computed, wall) -> list[str]:
    lam = result.eigenvalues[:, 0]
    lines = [
        f"{len(points)} point(s) ({computed} computed, {len(points) - computed} resumed) in {wall:.1f} s",
        f"{result.param}: {result.values[0]:.4g} -> {result.values[-1]:.4g}; "
        f"λ_max {lam[0]:.4g} -> {lam[-1]:.4g}; participation rank "
        f"{result.participation[0]:.3g} -> {result.participation[-1]:.3g}; entropy rank "
        f"{result.entropy[0]:.3g} -> {result.entropy[-1]:.3g}",
    ]
    if math.isfinite(result.critical_value):
        lines.append(f"predicted critical gain {result.critical_value:.4g}")
    for b in result.bifurcations:
        if b["kind"] == "stability_change":
            lo, hi = (result.values[i] for i in b["between"])
            lines.append(
                f"stability change between the sweep points {result.param} = "
                f"{lo:.5g} and {hi:.5g} (not located: no continued branch crosses it)"
            )
        else:
            where = (
                f"; the sweep's fixed points change stability between {result.param} = "
                f"{b['sweep_interval'][0]:.5g} and {b['sweep_interval'][1]:.5g}"
                if "sweep_interval" in b
                else ""
            )
            lines.append(
                f"bifurcation: {b['kind']} at {result.param} = {b['p']:.5g} (located by continuation{where})"
            )
    euler = euler_line([result.branch], result.param)[1]
    if euler:
        lines.append(euler)
    lines.append(RANK_LEGEND)
    lines.append(f"results: {folder.path}")
    lines.append("figures: " + ", ".join(str(p) for p in figs if p.suffix == ".png"))
    return lines


@main.command()
@common_options
@inputs_option
@click.option("--param", help="Swept parameter: gain, input, a model parameter name, or checkpoints.")
@click.option("--values", "values_text", metavar="V1,V2,...", help="Explicit comma-separated values.")
@click.option(
    "--checkpoints",
    multiple=True,
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="State-dict files to sweep over (repeat the option per file).",
)
@friendly
def sweep(
    config_file,
    overrides,
    seed,
    device,
    dtype,
    model_spec,
    out,
    fresh,
    quiet,
    inputs_file,
    param,
    values_text,
    checkpoints,
):
    """Spectral metrics and fixed points at every value of a parameter, bifurcations marked."""
    extra = list(overrides)
    if param:
        extra.append(f"sweep.param={param}")
    if values_text:
        extra.append(f"sweep.values={parse_list(values_text, 'values', float)}")
    cfg = resolve_config(
        "sweep",
        config_file,
        tuple(extra),
        seed=seed,
        device=device,
        dtype=dtype,
        model_spec=model_spec,
        inputs_file=inputs_file,
        checkpoints=checkpoints,
    )
    folder, result, points, figs, computed, wall = run_sweep("sweep", cfg, out, fresh, quiet)
    report(quiet, _lines(folder, result, points, figs, computed, wall), folder)


@main.command()
@common_options
@inputs_option
@friendly
def demo(config_file, overrides, seed, device, dtype, model_spec, out, fresh, quiet, inputs_file):
    """Watch the sNTK collapse as a CTRNN's gain crosses its first bifurcation (~15 s on 2 cores).

    A 24-unit CTRNN driven by weak noise (4 trials of 100 Euler steps, dt = 0.1) is swept in
    gain from 0.5 to 1.3 times the gain at which its trivial fixed point loses stability. At
    each gain: top eigenvalues, SLQ spectral density and effective ranks of K = J Jᵀ, the fixed
    points and their stability; the branch is continued in gain and its bifurcation located.
    """
    cfg = resolve_config(
        "demo",
        config_file,
        overrides,
        seed=seed,
        device=device,
        dtype=dtype,
        model_spec=model_spec,
        inputs_file=inputs_file,
    )
    title = (
        f"sNTK collapse at a bifurcation: CTRNN n={cfg['model']['state_size']}, "
        f"{cfg['inputs']['trials']} trials × {cfg['inputs']['steps']} steps"
    )
    folder, result, points, figs, computed, wall = run_sweep("demo", cfg, out, fresh, quiet, title)
    lines = _lines(folder, result, points, figs, computed, wall)
    lam = result.eigenvalues[:, 0]
    j = int(torch.argmax(lam))
    lines.insert(
        0,
        f"λ_max grows ×{float(lam.max() / lam[0]):.3g} and the participation rank "
        f"falls ×{float(result.participation[0] / result.participation.min()):.3g} "
        f"across the sweep (λ_max largest at {result.param} = {result.values[j]:.4g})",
    )
    report(quiet, lines, folder)
