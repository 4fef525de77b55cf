"""Attention-map reuse kernels: cached-map × V and capture (attention that also stores its map).

Triton kernels for CUDA, PyTorch references for everything else, one storage layout (:class:`CachedMap`) and a
registry of map formats (:mod:`.formats`).
"""
from . import formats
from .formats import FP4, FP8, MapFormat
from .api import BACKENDS, backend_available, cached_pv, capture
from .storage import KEY_BLOCK, CachedMap, storage_nbytes

__all__ = ["BACKENDS", "CachedMap", "FP4", "FP8", "KEY_BLOCK", "MapFormat", "backend_available", "cached_pv",
           "capture", "formats", "storage_nbytes"]
