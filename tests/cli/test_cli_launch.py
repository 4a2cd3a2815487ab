"""The command line under torchrun: ranks started as torchrun starts them (RANK, WORLD_SIZE,
MASTER_ADDR/PORT), each a real ``python -m lanczos_ntk`` process, against one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lanczos_ntk.cli._launch import Launch
from lanczos_ntk.cli._runs import load_inputs, make_inputs

TINY = [
    "--set",
    "model.state_size=5",
    "--set",
    "inputs.trials=6",
    "--set",
    "inputs.steps=12",
    "--set",
    "spectrum.k=4",
    "--threads",
    "1",
]
SWEEP = ["--set", "sweep.num=3", "--set", "inputs.trials=4", "--set", "inputs.steps=10", "--threads", "1"]

# a CTRNN whose rank DIE_RANK dies (or, DIE_HOW=hang, sleeps) at its DIE_AFTER-th forward: each
# sweep point builds its operator with one forward, so the death comes after a saved point
DYING = """
import os, time
import lanczos_ntk as lnk

class Dying(lnk.models.CTRNN):
    calls = 0

    def forward(self, u, h0=None):
        Dying.calls += 1
        if (os.environ.get("RANK", "single") == os.environ.get("DIE_RANK", "none")
                and Dying.calls >= int(os.environ.get("DIE_AFTER", "1"))):
            if os.environ.get("DIE_HOW") == "hang":
                time.sleep(600)
            os._exit(9)
        return super().forward(u, h0)

def build():
    return Dying(5, 1, seed=0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args_per_rank, cwd, env_extra=None, wait=120, others_wait=20):
    """Start one process per entry of ``args_per_rank`` as torchrun would, wait for rank 0.

    Returns ``[(returncode, stdout, stderr, seconds)]`` in rank order (ranks still running
    after rank 0 are killed and report ``None``).
    """
    port, world = _free_port(), len(args_per_rank)
    procs = []
    for rank, args in enumerate(args_per_rank):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            **(env_extra or {}),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lanczos_ntk", *args],
                cwd=cwd,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    t0, out = time.perf_counter(), []
    for i, p in enumerate(procs):
        try:
            o, e = p.communicate(timeout=wait if i == 0 else others_wait)
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            out.append((None, o, e, time.perf_counter() - t0))
            continue
        out.append((p.returncode, o, e, time.perf_counter() - t0))
    return out


def _single(args, cwd):
    res = subprocess.run(
        [sys.executable, "-m", "lanczos_ntk", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


def test_generated_and_file_inputs_are_the_same_dataset_for_any_number_of_ranks(tmp_path):
    cfg = {"file": "", "trials": 600, "steps": 3, "amplitude": 0.5, "kind": "noise"}
    whole = make_inputs(cfg, 2, dtype=torch.float64, seed=5)
    first = 0.5 * torch.randn(256, 3, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(whole[:256], first)  # up to 256 trials: one draw from the run's seed
    assert not torch.equal(whole[256:512], whole[:256])
    for kind in ("noise", "sine"):
        c = dict(cfg, kind=kind)
        whole = make_inputs(c, 2, dtype=torch.float64, seed=5)
        for world in (2, 3, 7):
            parts = [
                make_inputs(c, 2, dtype=torch.float64, seed=5, share=Launch(r, world).share)
                for r in range(world)
            ]
            assert [len(p) for p in parts] == [
                600 * (r + 1) // world - 600 * r // world for r in range(world)
            ]
            assert torch.equal(torch.cat(parts), whole)
    u = np.random.default_rng(0).standard_normal((7, 4, 2))
    np.save(tmp_path / "u.npy", u)
    torch.save(torch.from_numpy(u), tmp_path / "u.pt")
    np.savez(tmp_path / "u.npz", inputs=u)
    for name in ("u.npy", "u.pt", "u.npz"):
        parts = [
            load_inputs(tmp_path / name, 2, dtype=torch.float64, share=Launch(r, 3).share) for r in range(3)
        ]
        assert torch.equal(torch.cat(parts), torch.from_numpy(u)), name
    with pytest.raises(ValueError, match="cannot be shared by 8 ranks"):
        Launch(0, 8).share(7)


@pytest.mark.parametrize("world", [2, 3])
def test_spectrum_over_ranks_equals_one_process(tmp_path, world):
    _single(["spectrum", *TINY, "--out", "one", "--quiet"], tmp_path)
    res = _launch([["spectrum", *TINY, "--out", "many"]] * world, tmp_path)
    assert all(r[0] == 0 for r in res), [r[2][-800:] for r in res]
    # rank 0 alone prints and writes; the others say nothing
    assert "top eigenvalues" in res[0][1]
    assert all(r[1] == "" and "Error" not in r[2] for r in res[1:])
    one, many = _summary(tmp_path / "one"), _summary(tmp_path / "many")
    assert many["dimension_M"] == one["dimension_M"] == 6 * 12 * 5
    for key in (
        "top_eigenvalues",
        "trace",
        "participation_rank",
        "entropy_rank",
        "participation_rank_se",
        "trace_se",
    ):
        np.testing.assert_allclose(many[key], one[key], rtol=1e-8, err_msg=key)
    assert sorted(p.name for p in (tmp_path / "many").rglob("*")) == sorted(
        p.name for p in (tmp_path / "one").rglob("*")
    )
    # re-running resumes on every rank: rank 0 loads, the others are handed the result
    again = _launch([["spectrum", *TINY, "--out", "many", "--quiet"]] * world, tmp_path)
    assert all(r[0] == 0 for r in again), [r[2][-800:] for r in again]
    assert "spectrum: loaded from the previous run" in (tmp_path / "many" / "run.log").read_text()


def test_a_rank_that_dies_stops_the_others_and_a_rerun_resumes(tmp_path):
    (tmp_path / "dying.py").write_text(DYING)
    args = ["sweep", *SWEEP, "--model", "dying.py:build", "--out", "run", "--quiet"]
    res = _launch([args] * 2, tmp_path, {"DIE_RANK": "1", "DIE_AFTER": "4"})
    assert res[1][0] == 9
    rc, _, err, seconds = res[0]
    assert rc == 1 and "a collective with the other ranks failed" in err and seconds < 60
    assert "Traceback" not in err and "resume" in err
    saved = sorted(p.name for p in (tmp_path / "run" / "results").iterdir())
    assert saved == ["point-000.json", "point-000.npz"]  # what finished, nothing half-written
    again = _launch([args] * 2, tmp_path, {"DIE_RANK": "none", "DIE_AFTER": "1"})
    assert all(r[0] == 0 for r in again), [r[2][-800:] for r in again]
    assert "point-000 (gain=" in (tmp_path / "run" / "run.log").read_text()
    assert "loaded from the previous run" in (tmp_path / "run" / "run.log").read_text()
    _single(["sweep", *SWEEP, "--model", "dying.py:build", "--out", "one", "--quiet"], tmp_path)
    one, two = _summary(tmp_path / "one"), _summary(tmp_path / "run")
    np.testing.assert_allclose(
        [p["top_eigenvalues"] for p in two["points"]],
        [p["top_eigenvalues"] for p in one["points"]],
        rtol=1e-8,
    )
    np.testing.assert_allclose(
        [p["leading"] for p in two["points"]], [p["leading"] for p in one["points"]], rtol=1e-8
    )


def test_a_rank_that_hangs_times_out(tmp_path):
    (tmp_path / "dying.py").write_text(DYING)
    args = ["sweep", *SWEEP, "--model", "dying.py:build", "--out", "run", "--quiet", "--timeout", "3"]
    res = _launch(
        [args] * 2, tmp_path, {"DIE_RANK": "1", "DIE_AFTER": "4", "DIE_HOW": "hang"}, others_wait=1
    )  # the hanging rank is killed here
    rc, _, err, seconds = res[0]
    assert rc == 1 and "a collective with the other ranks failed" in err, err[-800:]
    assert seconds < 60


def test_ranks_with_different_configurations_are_refused(tmp_path):
    base = ["spectrum", *TINY, "--out", "run"]
    res = _launch([base, [*base, "--set", "model.gain=1.3"]], tmp_path)
    for rc, _, err, _ in res:
        assert rc == 2 and "different configurations" in err, err[-800:]
    assert not (tmp_path / "run").exists()
