"""``bifurcate``: continuation diagram of a model's fixed points, bifurcations located."""

from __future__ import annotations

import dataclasses

import click
import torch

from .. import dynamics
from .._tolerances import ON_BRANCH_TOL
from ._app import (
    common_options,
    friendly,
    main,
    model_and_inputs,
    progress,
    report,
    resolve_config,
    run_folder,
    save_figures,
)
from ._runs import ConfigError

__all__ = ["bifurcate"]


def _on_branch(x: torch.Tensor, p: float, branches, tol: float = ON_BRANCH_TOL) -> bool:
    for br in branches:
        if len(br) == 0:
            continue
        d = (br.points - x).abs().amax(dim=1) + (br.p - p).abs()
        if float(d.min()) < tol * (1 + float(x.abs().max())):
            return True
    return False


def _same_event(a, b, width: float) -> bool:
    return abs(a.p - b.p) <= 1e-4 * width and float((a.x - b.x).abs().max()) <= 1e-3 * (
        1 + float(b.x.abs().max())
    )


def _without_folds_at_branch_points(branches, width: float) -> list:
    """The branches with any fold located at a branch point removed: the same event (the
    bifurcating branch of a pitchfork, ``p = x²``, turns exactly there), reported as the
    branch point.
    """
    points = [k for br in branches for k in br.bifurcations if k.kind == "branch_point"]
    return [
        dataclasses.replace(
            br,
            bifurcations=[
                k
                for k in br.bifurcations
                if not (k.kind == "fold" and any(_same_event(o, k, width) for o in points))
            ],
        )
        for br in branches
    ]


def _unique_bifurcations(branches, width: float) -> list:
    """The branches' bifurcations, each once (branches traced from both ends may share some)."""
    out: list[dynamics.Bifurcation] = []
    for br in branches:
        for k in br.bifurcations:
            if not any(o.kind == k.kind and _same_event(o, k, width) for o in out):
                out.append(k)
    return out


@main.command()
@common_options
@friendly
def bifurcate(config_file, overrides, seed, device, dtype, model_spec, out, fresh, quiet):
    """Continuation diagram of a model's fixed points in one parameter, bifurcations located.

    Fixed points are searched at both ends of [start, stop] and each is continued into the
    window (pseudo-arclength), up to max_branches branches. Normal forms: --set model.form=hopf
    --set model.kind=flow; a CTRNN: --model ctrnn --set bifurcate.param=gain.
    """
    from ..experiments.sweep import euler_line
    from ..plotting import bifurcate_figure

    cfg = resolve_config(
        "bifurcate", config_file, overrides, seed=seed, device=device, dtype=dtype, model_spec=model_spec
    )
    b = cfg["bifurcate"]
    if not b["start"] < b["stop"]:
        raise ConfigError(f"bifurcate.start must be < bifurcate.stop, got {b['start']} and {b['stop']}")
    if b["max_branches"] < 1 or b["seeds"] < 1 or b["max_steps"] < 1:
        raise ConfigError("bifurcate.max_branches, seeds and max_steps must be >= 1")
    model, _ = model_and_inputs(cfg)
    if not hasattr(model, "rhs"):
        raise ConfigError(
            f"{type(model).__name__} has no rhs(h, u): bifurcation analysis needs a "
            "model of lanczos_ntk.models or one with kind, rhs, state_size, input_size"
        )
    u = torch.full((model.input_size,), float(b["input"]), dtype=torch.float64)
    try:
        system = dynamics.system_from_model(model, b["param"], u)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bifurcate.param: {exc}") from None
    gen = torch.Generator().manual_seed(cfg["seed"])
    branches = []
    with run_folder("bifurcate", cfg, out, fresh, quiet) as folder:
        starts = [(b["start"], 1), (b["stop"], -1)]
        with progress(quiet, total=b["max_branches"], desc="branches") as bar:
            for side, (p, direction) in enumerate(starts):
                fp = dynamics.find_fixed_points(system, p=p, num_seeds=b["seeds"], generator=gen)
                folder.log(f"p={p:.6g}: {len(fp)} fixed point(s)")
                for i in range(len(fp)):
                    if len(branches) >= b["max_branches"]:
                        break
                    x = fp.points[i]
                    if _on_branch(x, p, branches):
                        continue
                    name = f"branch-{side}-{i:02d}"
                    if folder.has(name):
                        br = folder.load(name)
                        folder.log(f"{name}: loaded from the previous run")
                    else:
                        br = dynamics.continuation(
                            system,
                            x,
                            p,
                            (b["start"], b["stop"]),
                            max_steps=b["max_steps"],
                            direction=direction,
                        )
                        folder.save(name, br)
                        folder.log(
                            f"{name}: {len(br)} points, {br.status.value}, bifurcations "
                            f"{[(k.kind, round(k.p, 6)) for k in br.bifurcations]}"
                        )
                    if len(br):
                        branches.append(br)
                    bar.update()
        if not branches:
            raise click.ClickException(
                "no fixed point found at either end of the window; widen "
                "[start, stop] or raise bifurcate.seeds"
            )
        branches = _without_folds_at_branch_points(branches, b["stop"] - b["start"])
        unique = _unique_bifurcations(branches, b["stop"] - b["start"])
        bifs = [
            {
                "kind": k.kind,
                "p": k.p,
                "x": k.x.tolist(),
                "eigenvalue": [k.eigenvalue.real, k.eigenvalue.imag],
                "coefficients": k.coefficients,
            }
            for k in unique
        ]
        euler, euler_text = euler_line(branches, b["param"])
        folder.write_json(
            "summary.json", {"branches": len(branches), "bifurcations": bifs, "euler_map": euler}
        )
        figs = save_figures(
            folder,
            {"bifurcation": bifurcate_figure(branches, unique, system.kind, f"parameter {b['param']}")},
        )
    lines = [f"{len(branches)} branch(es); bifurcations:"]
    lines += [
        f"  {d['kind']} at {b['param']} = {0.0 if abs(d['p']) < 1e-12 else d['p']:.6g}" for d in bifs
    ] or ["  none"]
    if euler_text:
        lines.append(euler_text)
    report(quiet, lines + [f"results: {folder.path}", f"figure: {figs[0]}"], folder)
