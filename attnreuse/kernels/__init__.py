"""Attention-map reuse kernels: cached-map × V and capture (attention that also stores its map).

Triton kernels for CUDA, PyTorch references for everything else, one storage format (:class:`CachedMap`).
"""
from .ops import BACKENDS, backend_available, cached_pv, capture
from .storage import FP4, FP8, KEY_BLOCK, CachedMap, storage_nbytes

__all__ = ["BACKENDS", "CachedMap", "FP4", "FP8", "KEY_BLOCK", "backend_available", "cached_pv", "capture",
           "storage_nbytes"]
