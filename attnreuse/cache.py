"""The maps of one generation, keyed by (layer, UNet call within the step), under a memory budget.

``store`` and ``lookup`` run inside the UNet's forward (also under ``torch.compile``): no host
synchronisation, no warnings, only Python ints; budget refusals are reported by :meth:`MapCache.clear`,
which the clock calls between steps.
"""
from __future__ import annotations

import warnings

import torch

from .kernels import CachedMap, storage_nbytes


class MapCache:
    """Entries are maps (:class:`CachedMap`) or, for ``target="output"``, whole attention outputs."""

    def __init__(self, max_bytes: float | None = None):
        self.max_bytes = max_bytes
        self.maps: dict[tuple[str, int], CachedMap | torch.Tensor] = {}
        self.declined: set[tuple[str, int]] = set()  # maps the budget had no room for
        self.fallbacks = 0  # reuse calls of a layer that had no map (it did not run when maps were captured)
        self.bytes = 0
        self.peak_bytes = 0

    def store(self, layer: str, call: int, entry: CachedMap | torch.Tensor) -> None:
        key = (layer, call)
        old = self.maps.pop(key, None)
        if old is not None:
            self.bytes -= _nbytes(old)
        nbytes = _nbytes(entry)
        if self.max_bytes is not None and self.bytes + nbytes > self.max_bytes:
            self.declined.add(key)
            return
        self.maps[key] = entry
        self.bytes += nbytes

    def lookup(self, layer: str, call: int) -> CachedMap | torch.Tensor | None:
        """The entry of ``layer`` for UNet call ``call`` of the capture step; None if there is none."""
        return self.maps.get((layer, call))

    def declined_entry(self, layer: str, call: int) -> bool:
        """Whether the budget had no room for this entry (else a missing entry is a layer that did not run when
        maps were captured, e.g. a block DeepCache skipped)."""
        return (layer, call) in self.declined

    def clear(self) -> None:
        """Drop every entry (the peak is kept) and warn about the maps the budget refused."""
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        if self.declined:
            layers = sorted({layer for layer, _ in self.declined})
            warnings.warn(f"attnreuse: max_cache_bytes={self.max_bytes:.4g} left no room for the maps of "
                          f"{len(layers)} layer(s) ({layers[0]}, ...): those layers computed instead",
                          stacklevel=3)
        self.maps.clear()
        self.declined.clear()
        self.bytes = 0


def _nbytes(entry: CachedMap | torch.Tensor) -> int:
    """Bytes of an entry; under torch.compile from its shape (``Tensor.nbytes`` fails on the symbolic shapes of a
    UNet compiled for a second resolution)."""
    if isinstance(entry, CachedMap):
        return storage_nbytes(*entry.shape, entry.format) if torch.compiler.is_compiling() else entry.nbytes
    return entry.numel() * entry.element_size()
