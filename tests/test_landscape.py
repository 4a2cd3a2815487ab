"""Normal-form amplification landscapes against closed forms, and the landscapes command."""

import json
import math

import pytest
import torch
from click.testing import CliRunner

from lanczos_ntk.cli import main
from lanczos_ntk.landscape import normal_form_landscape


def _transient(alpha, m, steps, s=1.0):
    """α₀ (Σ_t (s t m^{t-1})²)^{1/2}: the linear-regime response ∂h_t/∂μ = α₀ s t m^{t-1}."""
    return abs(alpha) * math.sqrt(sum((s * t * m ** (t - 1)) ** 2 for t in range(1, steps + 1)))


def test_linear_regime_and_fixed_point_closed_forms():
    r = normal_form_landscape("pitchfork", mu=[-0.2, -0.05], alpha=[0.0, 1e-4], steps=(5, 25))
    for i, T in enumerate((5, 25)):
        for j, mu in enumerate((-0.2, -0.05)):
            assert float(r.amplification[i, j, 0]) == 0.0  # the trivial state does not move
            assert float(r.amplification[i, j, 1]) == pytest.approx(_transient(1e-4, 1 + mu, T), rel=1e-6)
    # x ↦ x + μ - x² sitting at its stable fixed point √μ: e_{t+1} = m e_t + 1, m = 1 - 2√μ
    r = normal_form_landscape("saddle_node", mu=[0.04], alpha=[0.2], steps=(5, 25))
    m = 1 - 2 * 0.2
    for i, T in enumerate((5, 25)):
        want = math.sqrt(sum(((1 - m**t) / (1 - m)) ** 2 for t in range(1, T + 1)))
        assert float(r.amplification[i, 0, 0]) == pytest.approx(want, rel=1e-12)
    # a flow: Euler steps, m = 1 + dt μ, s = dt
    r = normal_form_landscape("pitchfork", kind="flow", mu=[-0.5], alpha=[1e-5], steps=(25,), dt=0.1)
    assert float(r.amplification[0, 0, 0]) == pytest.approx(_transient(1e-5, 1 - 0.05, 25, s=0.1), rel=1e-6)


def test_symmetric_forms_share_a_landscape_and_escapes_are_marked():
    grid = dict(mu=torch.linspace(-0.3, 0.3, 7), alpha=torch.linspace(-0.8, 0.8, 9), steps=(5, 25))
    ref = normal_form_landscape("pitchfork", **grid).amplification
    for form in ("flip", "neimark_sacker"):
        torch.testing.assert_close(
            normal_form_landscape(form, **grid).amplification, ref, rtol=1e-10, atol=1e-12
        )
    # x ↦ x + μ - x²: no fixed point for μ < 0 (every trial escapes), a stable one at √μ
    sn = normal_form_landscape("saddle_node", mu=[-0.4, 0.25], alpha=[-1.0, 0.5], steps=(25,))
    assert bool(sn.diverged[0, 0].all()) and bool(torch.isnan(sn.amplification[0, 0]).all())
    assert bool(sn.diverged[0, 1, 0]) and not bool(sn.diverged[0, 1, 1])
    assert math.isfinite(float(sn.amplification[0, 1, 1]))
    # T = 25 amplifies more than T = 5 near the bifurcation (the transient has time to grow)
    assert bool((ref[1, 3] >= ref[0, 3]).all())


def test_bad_input():
    with pytest.raises(ValueError, match="normal form"):
        normal_form_landscape("hopf")  # a flow's form asked of the maps
    with pytest.raises(ValueError, match="kind"):
        normal_form_landscape("pitchfork", kind="ode")
    with pytest.raises(ValueError, match="trial lengths"):
        normal_form_landscape("pitchfork", steps=(0,))


def test_landscapes_command(tmp_path):
    out = tmp_path / "land"
    args = ["landscapes", "--out", str(out), "--mu", "-0.3,0.3,7", "--alpha", "-0.5,0.5,5"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary) == ["flip", "neimark_sacker", "pitchfork", "saddle_node", "transcritical"]
    assert summary["pitchfork"]["T=25"]["max"] > summary["pitchfork"]["T=5"]["max"]
    assert (out / "figures" / "landscapes-map.png").exists()
    assert "pitchfork" in res.output and "grows" in res.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and json.loads((out / "summary.json").read_text()) == summary
    flow = CliRunner().invoke(
        main,
        [
            "landscapes",
            "--kind",
            "flow",
            "--out",
            str(tmp_path / "f"),
            "--mu",
            "-0.3,0.3,5",
            "--alpha",
            "-0.5,0.5,3",
            "--quiet",
        ],
    )
    assert flow.exit_code == 0, flow.output
    assert sorted(json.loads((tmp_path / "f" / "summary.json").read_text())) == [
        "hopf",
        "pitchfork",
        "saddle_node",
        "transcritical",
    ]
    for bad in (["--mu", "1,0,5"], ["--steps", "0"], ["--alpha", "a,b,c"], ["--dt", "0"]):
        r = CliRunner().invoke(main, ["landscapes", "--out", str(tmp_path / "b"), *bad])
        assert r.exit_code == 2, (bad, r.output)
