"""Runs launched by ``torchrun``: the process group, each rank's share of the trials, and a run
folder that rank 0 alone writes.

Under ``torchrun`` (``WORLD_SIZE > 1``) every command joins the launched group (``gloo`` on
the CPU, ``nccl`` on CUDA devices, ``--backend`` to override), and the spectral commands give
each rank its contiguous share of the trials: the sNTK's products all-reduce the ``P``-sized
``Jᵀ v`` (:class:`lanczos_ntk.StateNTK`'s ``process_group``), so every rank holds the same
global ``G`` and the same Lanczos vectors while the states are split. Rank 0 alone prints,
shows progress and writes the run folder; the other ranks run the same code against a
:class:`FollowerFolder`, which asks rank 0 for every resume decision and every resumed result,
so all ranks take the same path and call the same collectives.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .._results import load_result
from ._runs import ConfigError, RunFolder, config_digest

__all__ = ["SINGLE", "FollowerFolder", "Launch", "LeaderFolder", "launch_from_environment"]


@dataclasses.dataclass(frozen=True)
class Launch:
    """A process's place in a launched run: ``rank`` of ``world`` in ``group`` (``None``:
    a single process).
    """

    rank: int = 0
    world: int = 1
    group: Any = None

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that prints and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, trials: int) -> tuple[int, int]:
        """Return the rank's contiguous trials ``[lo, hi)`` of ``trials`` (sizes differ by at most 1)."""
        if trials < self.world:
            raise ConfigError(
                f"{trials} trial(s) cannot be shared by {self.world} ranks: each "
                f"rank needs at least one (raise inputs.trials or start fewer)"
            )
        return self.rank * trials // self.world, (self.rank + 1) * trials // self.world

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (plain data: bools, strings, bytes)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out


SINGLE = Launch()


def launch_from_environment(backend: str | None, device: str, timeout: float) -> Launch:
    """Join the group ``torchrun`` launched (``WORLD_SIZE > 1``), or :data:`SINGLE`.

    ``timeout`` (seconds) bounds every collective, so a rank whose peer died or hangs stops
    with an error instead of waiting for ever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return SINGLE
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks "
            "with torchrun (e.g. torchrun --nproc-per-node 2 -m lanczos_ntk ...)"
        )
    if not timeout > 0:
        raise ConfigError(f"expected --timeout > 0 seconds, got {timeout}")
    cuda = device.startswith("cuda")
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        raise ConfigError("--backend nccl needs a CUDA device (--device cuda); use gloo on the CPU")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return Launch(dist.get_rank(), dist.get_world_size(), dist.group.WORLD)


def check_same_configuration(launch: Launch, cfg: dict) -> None:
    """Every rank must run the same configuration: their digests are gathered and compared."""
    digests = launch.gather(config_digest(cfg))
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise ConfigError(
            f"the ranks were started with different configurations (rank(s) "
            f"{', '.join(map(str, odd))} differ from rank 0); give every rank the "
            f"same command line, configuration file and inputs"
        )


def _result_bytes(folder: RunFolder, name: str) -> dict[str, bytes]:
    p = folder.result_path(name)
    return {ext: p.with_name(name + ext).read_bytes() for ext in (".json", ".npz")}


class LeaderFolder(RunFolder):
    """Rank 0's run folder: a :class:`RunFolder` that shares each resume decision, and each
    resumed result, with the other ranks.
    """

    def __init__(self, *args, launch: Launch, **kwargs):
        super().__init__(*args, **kwargs)
        self.launch = launch

    def has(self, name: str) -> bool:
        return bool(self.launch.broadcast(super().has(name)))

    def load(self, name: str):
        result = super().load(name)
        self.launch.broadcast(_result_bytes(self, name))
        return result


class FollowerFolder:
    """The run folder as ranks other than 0 see it: nothing is written (results, figures and
    the log are rank 0's); resume decisions and resumed results come from rank 0.
    """

    def __init__(self, path, launch: Launch):
        self.path = Path(path)  # rank 0's folder, for messages
        self.launch = launch
        self.resumed = False
        self._scratch = tempfile.TemporaryDirectory(prefix="lanczos-ntk-rank-")

    def __enter__(self) -> FollowerFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._scratch.cleanup()

    def log(self, message: str) -> None:
        pass

    def result_path(self, name: str) -> Path:
        return self.path / "results" / name

    def has(self, name: str) -> bool:
        return bool(self.launch.broadcast(None))

    def load(self, name: str):
        payload = self.launch.broadcast(None)
        local = Path(self._scratch.name) / name
        for ext, data in payload.items():
            local.with_name(name + ext).write_bytes(data)
        return load_result(local)

    def save(self, name: str, result) -> Path:
        return self.result_path(name)

    def cached(self, name: str, compute, message: str):
        return self.load(name) if self.has(name) else compute()

    def write_json(self, name: str, data: Any) -> Path:
        return self.path / name

    def save_figure(self, fig, name: str) -> list[Path]:
        return [self.path / "figures" / f"{name}.{ext}" for ext in ("png", "pdf")]
