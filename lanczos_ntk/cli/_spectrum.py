"""``spectrum`` and ``density``: extreme eigenvalues, ranks, trace and the spectral density."""

from __future__ import annotations

import torch

from ._app import (
    RANK_LEGEND,
    ZERO_MASS_LEGEND,
    check_spectrum_cfg,
    common_options,
    friendly,
    inputs_option,
    main,
    make_operator,
    model_and_inputs,
    progress,
    report,
    resolve_config,
    run_folder,
    save_figures,
)
from ._runs import ConfigError

__all__ = ["density", "spectrum"]


def _operator_for(command, config_file, overrides, seed, device, dtype, model_spec, inputs_file):
    """The command's configuration and its sNTK operator (validated before anything is written)."""
    cfg = resolve_config(
        command,
        config_file,
        overrides,
        seed=seed,
        device=device,
        dtype=dtype,
        model_spec=model_spec,
        inputs_file=inputs_file,
    )
    check_spectrum_cfg(cfg)
    model, inputs = model_and_inputs(cfg)
    return cfg, make_operator(model, inputs, cfg)


@main.command()
@common_options
@inputs_option
@friendly
def spectrum(config_file, overrides, seed, device, dtype, model_spec, out, fresh, quiet, inputs_file):
    """Top/bottom eigenvalues, trace, effective ranks and condition number of the sNTK."""
    from ..experiments.sweep import SpectralSummary, density_of, spectral_summary
    from ..plotting import spectrum_figure

    cfg, K = _operator_for("spectrum", config_file, overrides, seed, device, dtype, model_spec, inputs_file)
    with run_folder("spectrum", cfg, out, fresh, quiet) as folder:
        if folder.has("spectrum"):
            summary = folder.load("spectrum")
            folder.log("spectrum: loaded from the previous run")
        else:
            with progress(quiet, total=3, desc="spectrum: top, bottom, SLQ") as bar:
                summary = spectral_summary(
                    K,
                    cfg["spectrum"],
                    torch.Generator().manual_seed(cfg["seed"]),
                    progress=lambda stage: bar.update(),
                )
            folder.save("spectrum", summary)
            folder.log(f"spectrum: computed in {summary.seconds:.2f} s")
        if not isinstance(summary, SpectralSummary):
            raise ConfigError(f"{folder.result_path('spectrum')} does not hold a spectrum; use --fresh")
        density = density_of(summary, cfg["density"])
        folder.save("density", density)
        metrics = summary.metrics()
        folder.write_json("summary.json", metrics)
        figs = save_figures(folder, {"spectrum": spectrum_figure(summary, density)})
        folder.log("figures written")
    top = ", ".join(f"{v:.4g}" for v in metrics["top_eigenvalues"])
    report(
        quiet,
        [
            f"M = {metrics['dimension_M']} (computed on the {metrics['side']} side)",
            f"top eigenvalues: {top}",
            f"trace {metrics['trace']:.4g} ± {metrics['trace_se']:.2g}",
            f"effective rank: participation {metrics['participation_rank']:.4g} "
            f"± {metrics['participation_rank_se']:.2g}, entropy "
            f"{metrics['entropy_rank']:.4g} ± {metrics['entropy_rank_se']:.2g} "
            f"(top {metrics['deflated_k']} eigenvalues exact, the rest by SLQ)",
            f"eigensolver: {metrics['status']} "
            f"({sum(metrics['top_converged'])} of {len(metrics['top_converged'])} "
            f"eigenpairs to tol)",
            f"condition number (nonzero part): {metrics['condition_number']:.4g}",
            RANK_LEGEND,
            f"results: {folder.path}",
            f"figure: {figs[0]}",
        ],
        folder,
    )


@main.command()
@common_options
@inputs_option
@friendly
def density(config_file, overrides, seed, device, dtype, model_spec, out, fresh, quiet, inputs_file):
    """Spectral density of the sNTK: the top eigenvalues exactly plus stochastic Lanczos
    quadrature of the rest (linear and log scale).
    """
    from .. import deflated_slq, spectral_density
    from ..plotting import density_figure

    cfg, K = _operator_for("density", config_file, overrides, seed, device, dtype, model_spec, inputs_file)
    s_cfg, d_cfg = cfg["spectrum"], cfg["density"]
    with run_folder("density", cfg, out, fresh, quiet) as folder:
        if folder.has("slq"):
            r = folder.load("slq")
            folder.log("slq: loaded from the previous run")
        else:
            with progress(quiet, total=1, desc="SLQ") as bar:
                r = deflated_slq(
                    K,
                    s_cfg["num_probes"],
                    s_cfg["num_steps"],
                    generator=torch.Generator().manual_seed(cfg["seed"]),
                    tol=float(s_cfg["tol"]),
                )
                bar.update()
            folder.save("slq", r)
            folder.log(f"slq: {r.num_matvecs} products")
        sigma = d_cfg["sigma"] or None  # in the units of density.scale; the other is automatic
        lin = spectral_density(
            r,
            sigma=sigma if d_cfg["scale"] == "linear" else None,
            num_points=d_cfg["num_points"],
            scale="linear",
        )
        log = spectral_density(
            r, sigma=sigma if d_cfg["scale"] == "log" else None, num_points=d_cfg["num_points"], scale="log"
        )
        folder.save("density_linear", lin)
        folder.save("density_log", log)
        folder.write_json(
            "summary.json",
            {
                "zero_mass": lin.zero_mass,
                "zero_mass_se": lin.zero_mass_se,
                "dimension_M": r.primal_dimension,
                "side": r.side,
                "matvecs": r.num_matvecs,
            },
        )
        figs = save_figures(folder, {"density": density_figure(lin, log)})
    report(
        quiet,
        [
            f"M = {r.primal_dimension}, zero mass {lin.zero_mass:.4g} ± {lin.zero_mass_se:.2g}",
            ZERO_MASS_LEGEND,
            f"results: {folder.path}",
            f"figure: {figs[0]}",
        ],
        folder,
    )
