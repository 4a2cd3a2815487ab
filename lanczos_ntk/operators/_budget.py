"""Memory budget of the operators: how much there is, and what one trial of a chunk costs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

__all__ = ["DEFAULT_BUDGET_FRACTION", "ProductPlan", "available_memory", "saved_bytes"]

#: Default budget: this fraction of the memory available on the model's device.
DEFAULT_BUDGET_FRACTION = 0.5


def available_memory(device: torch.device) -> int:
    """Bytes available on ``device``: free GPU memory, or the host's ``MemAvailable``."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves while ``fn()`` runs (its graph's size)."""
    seen: dict[tuple, int] = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class ProductPlan:
    """How an operator computes its products within its memory budget.

    Attributes
    ----------
    path : "closed_form", "cell" or "autograd"
        ``closed_form``: the CTRNN / DiscreteRNN linear recurrences; ``cell``: the model's
        one-step cell linearised along the cached trajectory; ``autograd``: the whole forward
        differentiated as it is (forward-only modules).
    jvp : how ``J x`` is computed ("structured", "cell", "forward", "double_vjp" or "linearize")
    cell : which cell the ``cell`` path uses (``""`` otherwise)
    trials, chunk_size, num_chunks : the chunking over trials
    cached : whether every chunk's linearisation is kept between products (the forward then
        runs once per chunk for the operator's lifetime)
    cache_bytes : estimated bytes of the cached linearisations (all chunks)
    work_bytes_per_vector : estimated transient bytes of one chunk's product, per vector
    block_columns : the most vectors of a block that go through one pass together
    budget_bytes : the memory budget
    trace_after : with ``jvp="forward"`` chosen by ``auto`` for a large opaque module, the number
        of ``J x`` vectors after which the forward is traced once (``torch.func.linearize``) and
        ``jvp`` becomes ``"linearize"``; None otherwise
    """

    path: str
    jvp: str
    cell: str
    trials: int
    chunk_size: int
    num_chunks: int
    cached: bool
    cache_bytes: int
    work_bytes_per_vector: int
    block_columns: int
    budget_bytes: int
    trace_after: int | None = None

    def __str__(self) -> str:
        how = f"{self.path} path" + (f" ({self.cell})" if self.cell else "") + f", J x by {self.jvp}"
        if self.trace_after is not None:
            how += f" (traced after {self.trace_after} vectors)"
        cache = (
            f"linearisations cached ({_mib(self.cache_bytes)})"
            if self.cached
            else "linearisations recomputed per product"
        )
        return (
            f"{how}; {self.trials} trials in {self.num_chunks} chunk(s) of ≤ {self.chunk_size}; "
            f"{cache}; ≈ {_mib(self.work_bytes_per_vector)} per vector per chunk, blocks of ≤ "
            f"{self.block_columns} vectors per pass; budget {_mib(self.budget_bytes)}"
        )
