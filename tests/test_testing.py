"""The dense references themselves, against central finite differences of the plain forward (no
functional_call, no autograd): the truth every operator test leans on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lanczos_ntk import models
from lanczos_ntk.testing import dense_jacobian
from tests.helpers import inputs


def _finite_differences(model, u, outputs, names, eps=1e-6):
    named = dict(model.named_parameters())

    def run():
        with torch.no_grad():
            out = model(u)
            out = out[0] if isinstance(out, tuple) else out
            return (model.readout(out) if outputs == "readout" else out).reshape(-1).clone()

    cols = []
    for n in names:
        p = named[n]
        flat = p.data.view(-1)
        for j in range(flat.numel()):
            keep = float(flat[j])
            flat[j] = keep + eps
            up = run()
            flat[j] = keep - eps
            down = run()
            flat[j] = keep
            cols.append((up - down) / (2 * eps))
    return torch.stack(cols, 1)


def _torch_gru():
    torch.manual_seed(0)  # nn.GRU initialises from the global generator
    return nn.GRU(2, 3, batch_first=True, dtype=torch.float64)


@pytest.mark.parametrize(
    "build, outputs, names",
    [
        (lambda: models.CTRNN(3, 2, gain=1.3, readout_size=2, seed=0), "readout", ["readout.weight", "W"]),
        (lambda: models.GRU(3, 2, seed=1), "states", None),
        (_torch_gru, "states", ["weight_hh_l0", "bias_ih_l0"]),  # a subset, in this order
    ],
)
def test_dense_jacobian_matches_finite_differences(build, outputs, names):
    model, u = build(), inputs(B=2, T=3, d=2)
    if names is None:
        names = [n for n, _ in model.named_parameters()]
    J = dense_jacobian(model, u, outputs=outputs, params=names)
    fd = _finite_differences(model, u, outputs, names)
    assert J.shape == fd.shape
    torch.testing.assert_close(J, fd, rtol=1e-6, atol=1e-8)
