"""Work buffers reused from product to product.

A product on a large chunk writes several ``M``-sized intermediates (a trajectory of tangents,
of cotangents, gate cotangents). Allocated anew for every product, each costs the operating
system's page faults and zeroing on first touch (tensors over the C allocator's mapping
threshold, 32 MiB, are mapped and unmapped every time); at ``M = 3.3M`` states that was a fifth
of a product. The engine keeps one :class:`Scratch` and lends its buffers to the product paths
for what never leaves a product.
"""

from __future__ import annotations

import torch

__all__ = ["Scratch", "fresh"]


class Scratch:
    """Named buffers, one per name, reallocated only when the shape, dtype or device changes.

    A buffer is valid until the next request under the same name: the product paths ask for
    each name once per product and never return a buffer to the caller of the engine.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised buffer of ``shape`` with ``like``'s dtype and device."""
        buf = self._buffers.get(name)
        if (
            buf is None
            or tuple(buf.shape) != tuple(shape)
            or buf.dtype != like.dtype
            or buf.device != like.device
        ):
            self._buffers.pop(name, None)  # free the old one before allocating
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
            self._buffers[name] = buf
        return buf

    def clear(self) -> None:
        """Drop every buffer."""
        self._buffers.clear()

    @property
    def sizes(self) -> dict[str, int]:
        """Elements held under each name."""
        return {name: b.numel() for name, b in self._buffers.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def fresh(name: str, shape: tuple[int, ...], like: torch.Tensor, scratch: Scratch | None) -> torch.Tensor:
    """A work buffer: from ``scratch`` when there is one, else newly allocated."""
    if scratch is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    return scratch.get(name, shape, like)


def writable(view: torch.Tensor, consume: bool, name: str, scratch: Scratch | None) -> torch.Tensor:
    """``view``'s values in a contiguous tensor the caller may write into: ``view`` itself when
    it is contiguous and its owner gave it up (``consume``: a product's own ``J x`` inside
    ``Jᵀ J x``), else a copy in the work buffer ``name``.
    """
    if consume and view.is_contiguous():
        return view
    return fresh(name, tuple(view.shape), view, scratch).copy_(view)
