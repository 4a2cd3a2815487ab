"""Figures from result objects (matplotlib is imported lazily, inside the functions).

Every ``plot_*`` function takes a result (or plain arrays) and optional axes, draws on them (a
new figure when they are None) and returns the axes; every ``*_figure(s)`` function composes a
whole figure from results and returns it (or a dict of them). Nothing is shown or saved: the
caller decides (the command line saves PNG and PDF with the Agg backend).

Spectra (:mod:`._spectra`)
    :func:`plot_spectral_density` (linear or log scale, zero mass noted), :func:`plot_eigenvalues`
    (the complex plane with the stability boundary: imaginary axis for a flow, unit circle for a
    map), :func:`spectrum_figure`, :func:`density_figure`.
Dynamics (:mod:`._dynamics`)
    :func:`plot_sweep` (top eigenvalues, effective rank, trace, ... against a swept parameter,
    bifurcations marked), :func:`plot_bifurcation_diagram` (branches stable solid, unstable
    dashed, special points labelled by kind), :func:`sweep_figures`, :func:`bifurcate_figure`.
Training (:mod:`._training`)
    :func:`plot_track` (a :class:`~lanczos_ntk.track.KernelTracker`'s records), and the
    student–teacher experiment's :func:`plot_collapse`, :func:`plot_landscape`,
    :func:`plot_optimizers`.
Normal forms (:mod:`._landscape`)
    :func:`landscapes_figure` (finite-T amplification over ``(μ, α₀)``).
"""

from ._common import BIFURCATION_STYLE, fmt_param
from ._dynamics import bifurcate_figure, plot_bifurcation_diagram, plot_sweep, sweep_figures
from ._landscape import landscapes_figure
from ._spectra import density_figure, plot_eigenvalues, plot_spectral_density, spectrum_figure
from ._training import plot_collapse, plot_landscape, plot_optimizers, plot_track

__all__ = [
    "BIFURCATION_STYLE",
    "bifurcate_figure",
    "density_figure",
    "fmt_param",
    "landscapes_figure",
    "plot_bifurcation_diagram",
    "plot_collapse",
    "plot_eigenvalues",
    "plot_landscape",
    "plot_optimizers",
    "plot_spectral_density",
    "plot_sweep",
    "plot_track",
    "spectrum_figure",
    "sweep_figures",
]
