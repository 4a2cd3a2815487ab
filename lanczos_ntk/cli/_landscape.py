"""``lanczos-ntk landscapes``: finite-``T`` amplification ``‖D_μ h‖`` of the normal forms.

Drives :func:`lanczos_ntk.landscape.normal_form_landscape` for every form of one kind, saves
each result in the run folder (resumable), draws one heat map per form and trial length and
prints where the amplification is largest and how it grows from the shortest to the longest
trial.
"""

from __future__ import annotations

import math
from typing import Any

import click
import torch

from ..plotting import landscapes_figure
from ._app import friendly, main, run_folder
from ._runs import ConfigError, parse_list

__all__ = ["landscapes_command"]


def _summary(res) -> dict:
    """Per trial length: the largest amplification and where; the growth to the longest T."""
    out: dict[str, Any] = {}
    amp = res.amplification
    for i, t in enumerate(res.steps.tolist()):
        a = torch.nan_to_num(amp[i], nan=0.0)
        k = int(a.argmax())
        j, m = divmod(k, amp.shape[2])
        out[f"T={t}"] = {
            "max": float(a.max()),
            "at_mu": float(res.mu[j]),
            "at_alpha": float(res.alpha[m]),
            "median": float(a[a > 0].median()) if bool((a > 0).any()) else 0.0,
        }
    first, last = out[f"T={res.steps[0]}"], out[f"T={res.steps[-1]}"]
    out["growth_of_max"] = last["max"] / first["max"] if first["max"] > 0 else math.inf
    return out


@main.command("landscapes")
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default="runs/landscapes",
    show_default=True,
    help="Run folder (results/, figures/, summary.json); re-running resumes.",
)
@click.option(
    "--kind",
    type=click.Choice(["map", "flow"]),
    default="map",
    show_default=True,
    help="map: the five discrete normal forms (saddle_node = fold, transcritical, "
    "pitchfork, flip, neimark_sacker; the figure's rows carry these names); "
    "flow: the four continuous ones, Euler step --dt.",
)
@click.option(
    "--steps", "steps_text", default="5,25", show_default=True, metavar="T1,T2,...", help="Trial lengths."
)
@click.option(
    "--mu",
    "mu_text",
    default="-0.5,0.5,81",
    show_default=True,
    metavar="LO,HI,N",
    help="Grid of the unfolding parameter.",
)
@click.option(
    "--alpha",
    "alpha_text",
    default="-1,1,61",
    show_default=True,
    metavar="LO,HI,N",
    help="Grid of the initial state (first coordinate).",
)
@click.option("--dt", type=float, default=0.05, show_default=True, help="Euler step of the flows.")
@click.option("--fresh", is_flag=True, help="Discard what the run folder holds and start over.")
@click.option("--quiet", is_flag=True, help="No summary on the terminal.")
@friendly
def landscapes_command(out, kind, steps_text, mu_text, alpha_text, dt, fresh, quiet):
    """Finite-T amplification ‖∂h/∂μ‖ of the normal forms over (μ, initial state)."""
    import matplotlib.pyplot as plt

    from .. import landscape as L
    from ..models import CONTINUOUS_FORMS, DISCRETE_FORMS

    def grid(text, name):
        parts = text.split(",")
        try:
            lo, hi, num = float(parts[0]), float(parts[1]), int(parts[2])
        except (ValueError, IndexError):
            raise click.UsageError(f"--{name}: expected LO,HI,N (e.g. -0.5,0.5,81), got {text!r}") from None
        if len(parts) != 3 or num < 2 or not lo < hi:
            raise click.UsageError(f"--{name}: expected LO < HI and N >= 2, got {text!r}")
        return torch.linspace(lo, hi, num, dtype=torch.float64)

    try:
        steps = parse_list(steps_text, "steps", int)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None
    if min(steps) < 1:
        raise click.UsageError(f"--steps: expected trial lengths >= 1, got {steps_text!r}")
    if not dt > 0:
        raise click.UsageError(f"--dt: expected a positive Euler step, got {dt}")
    mu, alpha = grid(mu_text, "mu"), grid(alpha_text, "alpha")
    forms = DISCRETE_FORMS if kind == "map" else CONTINUOUS_FORMS
    config = {
        "kind": kind,
        "steps": steps,
        "mu": mu_text,
        "alpha": alpha_text,
        "dt": dt if kind == "flow" else 1.0,
    }
    with run_folder("landscapes", config, out, fresh, quiet) as run:
        results = [
            run.cached(
                f"{kind}-{form}",
                lambda form=form: L.normal_form_landscape(
                    form, kind=kind, mu=mu, alpha=alpha, steps=steps, dt=dt
                ),
                f"{kind} {form}",
            )
            for form in forms
        ]
        summary = {r.form: _summary(r) for r in results}
        run.write_json("summary.json", summary)
        fig = landscapes_figure(results)
        paths = run.save_figure(fig, f"landscapes-{kind}")
        plt.close(fig)
        run.log("done")
    if quiet:
        return
    click.echo(f"‖∂h/∂μ‖ of the {kind} normal forms over μ ∈ [{mu_text}], α₀ ∈ [{alpha_text}]:")
    for form, s in summary.items():
        parts = [
            f"T={t}: max {s[f'T={t}']['max']:.3g} at (μ={s[f'T={t}']['at_mu']:.3g}, "
            f"α₀={s[f'T={t}']['at_alpha']:.3g})"
            for t in steps
        ]
        click.echo(
            f"  {form:15s} "
            + "; ".join(parts)
            + f"; the maximum grows ×{s['growth_of_max']:.3g} from T={steps[0]} to "
            f"T={steps[-1]}"
        )
    click.echo(f"results: {run.path}")
    click.echo(f"figure: {paths[0]}")
