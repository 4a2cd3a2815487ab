"""lanczos_ntk.plotting draws what it should on the Agg backend and returns the axes."""

from __future__ import annotations

import subprocess
import sys

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402

from lanczos_ntk import plotting  # noqa: E402
from lanczos_ntk._results import Status  # noqa: E402
from lanczos_ntk.dynamics import Branch  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, lanczos_ntk; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def _branch(p, x, stable, bifurcations=()):
    n = len(p)
    return Branch(
        points=torch.as_tensor(x, dtype=torch.float64).reshape(n, -1),
        p=torch.as_tensor(p, dtype=torch.float64),
        stable=torch.as_tensor(stable),
        n_unstable=(~torch.as_tensor(stable)).long(),
        leading_eigenvalues=torch.zeros(n, 1, dtype=torch.complex128),
        tangents=torch.zeros(n, 2, dtype=torch.float64),
        bifurcations=list(bifurcations),
        kind="flow",
        status=Status.CONVERGED,
    )


class _Bif:  # the fields plot_bifurcation_diagram reads from a Bifurcation
    def __init__(self, kind, p, x):
        self.kind, self.p, self.x = kind, p, torch.tensor([x], dtype=torch.float64)


def test_bifurcation_diagram_stable_solid_unstable_dashed_points_marked():
    p = np.linspace(-1, 1, 9)
    br = _branch(p, np.zeros(9), p < 0.1, [_Bif("branch_point", 0.0, 0.0)])
    ax = plotting.plot_bifurcation_diagram(br)
    assert isinstance(ax, matplotlib.axes.Axes)
    styles = [(ln.get_linestyle(), ln.get_label()) for ln in ax.lines]
    solid = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    dashed = [ln for ln in ax.lines if ln.get_linestyle() == "--"]
    assert len(solid) == 1 and len(dashed) == 1, styles
    # the stability break sits at the located bifurcation, not half-way between samples
    assert solid[0].get_xdata()[-1] == 0.0 and dashed[0].get_xdata()[0] == 0.0
    markers = [ln for ln in ax.lines if ln.get_marker() == "D"]
    assert len(markers) == 1 and markers[0].get_xdata()[0] == 0.0
    assert any("branch point" in t.get_text() for t in ax.texts)
    labels = ax.get_legend_handles_labels()[1]
    assert {"stable", "unstable", "branch point"} <= set(labels)


def test_bifurcation_diagram_several_branches_and_coordinates():
    p = np.linspace(0, 1, 5)
    up = _branch(p, np.sqrt(p), np.ones(5, dtype=bool))
    down = _branch(p, -np.sqrt(p), np.ones(5, dtype=bool))
    ax = plotting.plot_bifurcation_diagram([up, down], param="mu")
    assert len(ax.lines) == 2 and ax.get_xlabel() == "mu"
    ax2 = plotting.plot_bifurcation_diagram(_branch(p, np.stack([p, p], 1), p > 2), coordinate="norm")
    assert "norm" in ax2.get_ylabel()
    np.testing.assert_allclose(ax2.lines[0].get_ydata(), np.sqrt(2) * p)


def test_sweep_plot_lines_and_bifurcation_markers():
    sweep = {
        "values": np.linspace(0.5, 1.5, 5),
        "eigenvalues": np.abs(np.random.default_rng(0).normal(size=(5, 3))) + 1,
        "participation": np.linspace(5, 1, 5),
        "entropy": np.linspace(7, 2, 5),
        "param": "gain",
        "bifurcations": [{"kind": "branch_point", "p": 1.0}, {"kind": "stability_change", "p": 0.9}],
    }
    ax = plotting.plot_sweep(sweep)
    data = [ln for ln in ax.lines if len(ln.get_xdata()) == 5]
    assert len(data) == 3 and ax.get_yscale() == "log"
    vlines = [ln for ln in ax.lines if len(ln.get_xdata()) == 2 and ln.get_xdata()[0] == ln.get_xdata()[1]]
    assert sorted(float(ln.get_xdata()[0]) for ln in vlines) == [0.9, 1.0]
    ax = plotting.plot_sweep(sweep, quantity="effective_rank")
    assert len([ln for ln in ax.lines if len(ln.get_xdata()) == 5]) == 2
    assert ax.get_xlabel() == "gain" and ax.get_yscale() == "linear"
    with pytest.raises(ValueError, match="unknown quantity"):
        plotting.plot_sweep(sweep, quantity="nope")


def test_spectral_density_linear_log_and_zero_mass():
    grid = np.linspace(0, 10, 50)
    dens = np.exp(-((grid - 5) ** 2))
    _, (a, b) = plt.subplots(1, 2)
    assert plotting.plot_spectral_density((grid, dens, 0.25), a) is a
    assert a.get_xscale() == "linear" and any("0.25" in t.get_text() for t in a.texts)
    plotting.plot_spectral_density((grid, dens), b, log=True)
    assert b.get_xscale() == "log" and b.get_yscale() == "log" and not b.texts
    assert np.all(b.lines[0].get_xdata() > 0)


def test_spectral_density_from_an_slq_result():
    import lanczos_ntk as lnk

    A = torch.diag(torch.tensor([0.0, 0.0, 1.0, 2.0, 10.0], dtype=torch.float64))
    r = lnk.slq(A, num_probes=4, num_steps=5, generator=torch.Generator().manual_seed(0))
    d = lnk.spectral_density(r, scale="log")
    ax = plotting.plot_spectral_density(d, log=True)
    x = ax.lines[0].get_xdata()
    assert x.min() < 1.0 and x.max() > 10.0  # drawn in λ, not in log10 λ
    assert any("zero mass" in t.get_text() for t in ax.texts)


def test_eigenvalues_flow_and_map():
    eigs = np.array([-1 + 2j, -1 - 2j, 0.5 + 0j])
    ax = plotting.plot_eigenvalues(eigs, kind="flow")
    assert ax.get_xlabel() == "Re λ"
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 1]  # stable, unstable
    ax = plotting.plot_eigenvalues(np.array([0.5, 1.5j]), kind="map")
    circle = [ln for ln in ax.lines if "unit circle" in ln.get_label()]
    assert len(circle) == 1
    np.testing.assert_allclose(np.hypot(circle[0].get_xdata(), circle[0].get_ydata()), 1.0)
    plotting.plot_eigenvalues(np.array([0.2]), ax=ax, kind="map", label="second")
    assert len([ln for ln in ax.lines if "unit circle" in ln.get_label()]) == 1
    with pytest.raises(ValueError):
        plotting.plot_eigenvalues(eigs, kind="ode")
