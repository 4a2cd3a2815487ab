"""Default configuration of every command (the schema: unknown keys are errors)."""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["DEFAULTS", "RENAMED", "defaults_for"]

# configuration keys renamed to the library's argument names: the old names are still read
RENAMED = {
    ("spectrum", "probes"): "num_probes",
    ("spectrum", "lanczos_steps"): "num_steps",
    ("density", "points"): "num_points",
}

_COMMON = {"seed": 0, "device": "cpu", "dtype": "float64"}

_MODEL = {
    # "ctrnn", "rnn", "gru", "ssm", "normal_form", or a factory "package.module:factory" /
    # "path/to/file.py:factory" returning an nn.Module (called with the [model.kwargs] table)
    "name": "ctrnn",
    "state_size": 16,
    "input_size": 1,
    "gain": 1.0,
    "dt": 0.1,
    "input_scale": 1.0,
    "readout_size": 0,  # > 0 adds a linear readout (ctrnn, rnn, gru), for spectrum.outputs = "readout"
    "seed": 0,  # weights of a built-in model; the global RNG while a factory runs
    "form": "pitchfork",  # normal forms: see lanczos_ntk.models
    "kind": "flow",  # normal forms: "flow" or "map"
    "mu": -0.5,  # normal forms: starting value of the bifurcation parameter
    "kwargs": {},
}

_INPUTS = {
    "file": "",  # a .pt tensor or an .npz with one array (or a key "inputs"), [trials, steps, d_in]
    "trials": 4,
    "steps": 50,
    "amplitude": 0.05,
    "kind": "noise",  # "noise", "constant", "zeros", "sine"
}

_SPECTRUM = {
    "k": 6,  # top eigenvalues
    "bottom": 2,  # smallest nonzero eigenvalues (0: skip; condition number then not computed)
    "tol": 1e-6,
    "num_probes": 8,  # SLQ probes (the library's num_probes)
    "num_steps": 30,  # SLQ Lanczos steps per probe (the library's num_steps)
    "outputs": "states",  # "states" or "readout"
}

_DENSITY = {
    "scale": "log",  # smooth in "linear" λ or in "log" (log10 λ)
    "num_points": 400,  # grid of the density (the library's num_points)
    "sigma": 0.0,  # Gaussian width in the units of scale (λ or decades); 0: 1% of the range
}

_DYNAMICS = {
    "fixed_points": True,
    "seeds": 32,
    "input": "mean",  # constant input of the autonomous system: "zero" or "mean" of the inputs
    "continuation": True,
    "max_steps": 300,
}

_SWEEP = {
    "param": "gain",  # "gain", "input", the name of a model parameter, or "checkpoints"
    "values": [],  # explicit values; otherwise num points from start to stop
    "start": 0.5,
    "stop": 1.5,
    "num": 9,
    "relative_to_critical": False,  # gain only: values (or start/stop) in units of the critical gain
    "checkpoints": [],  # state-dict files (torch.save(model.state_dict())), param = "checkpoints"
    "densities": 3,  # spectral densities drawn at this many sweep points
}

_BIFURCATE = {
    "param": "mu",  # "mu" (normal forms), "gain", "input" or a model parameter name
    "start": -1.0,
    "stop": 1.0,
    "max_steps": 400,
    "max_branches": 6,
    "seeds": 32,
    "input": 0.0,  # constant input level (every input channel)
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "spectrum": {**_COMMON, "model": _MODEL, "inputs": _INPUTS, "spectrum": _SPECTRUM, "density": _DENSITY},
    "density": {**_COMMON, "model": _MODEL, "inputs": _INPUTS, "spectrum": _SPECTRUM, "density": _DENSITY},
    "sweep": {
        **_COMMON,
        "model": _MODEL,
        "inputs": _INPUTS,
        "spectrum": _SPECTRUM,
        "density": _DENSITY,
        "dynamics": _DYNAMICS,
        "sweep": _SWEEP,
    },
    "bifurcate": {**_COMMON, "model": {**_MODEL, "name": "normal_form", "mu": -1.0}, "bifurcate": _BIFURCATE},
}

# The demo: a CTRNN swept in gain across the loss of stability of its trivial fixed point.
DEFAULTS["demo"] = copy.deepcopy(DEFAULTS["sweep"])
DEFAULTS["demo"]["model"].update(state_size=24, input_size=1, gain=1.0, dt=0.1, seed=3)
DEFAULTS["demo"]["inputs"].update(trials=4, steps=100, amplitude=0.01, kind="noise")
DEFAULTS["demo"]["spectrum"].update(k=5, bottom=0, num_probes=10, num_steps=40)
DEFAULTS["demo"]["density"].update(sigma=0.12)  # in decades (the density is smoothed in log10 λ)
DEFAULTS["demo"]["dynamics"].update(input="zero", seeds=24, max_steps=200)
DEFAULTS["demo"]["sweep"].update(param="gain", start=0.5, stop=1.3, num=17, relative_to_critical=True)


def defaults_for(command: str) -> dict:
    """A fresh copy of a command's defaults."""
    return copy.deepcopy(DEFAULTS[command])
