"""Public entry points: pick the Triton kernels for CUDA tensors, the PyTorch reference otherwise.

``backend``: ``"auto"`` (Triton on CUDA when importable, else reference), ``"triton"`` or ``"torch"``.
"""
from __future__ import annotations

import functools

import torch

from .reference import cached_pv_reference, capture_reference
from .storage import FP8, CachedMap

BACKENDS = ("auto", "triton", "torch")


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32, FP8)


def _use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether to run the Triton kernels; ``"triton"`` on tensors they cannot take is an error."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: pass one of {BACKENDS}")
    if backend == "torch":
        return False
    usable = all(t.is_cuda and t.dtype in _TRITON_DTYPES for t in tensors)
    if backend == "triton" and not usable:
        raise ValueError("backend='triton' needs CUDA tensors in fp16, bf16 or fp32 (maps also fp8); got "
                         f"{sorted({f'{t.device.type} {t.dtype}' for t in tensors})}: use backend='auto' or 'torch'")
    return usable and backend_available()


@functools.cache
def backend_available() -> bool:
    """Whether the Triton kernels can run here (Triton importable and a CUDA device present)."""
    try:
        from . import triton_ops  # noqa: F401  (imports triton)
    except ImportError:
        return False
    return torch.cuda.is_available()


def capture(q, k, v, heads: int, scale: float, map_dtype: torch.dtype, mask=None, backend: str = "auto"):
    """Attention ``softmax(q kᵀ·scale + mask) v`` and its map stored as ``map_dtype``.

    ``q``: ``[B, Nq, H·D]``; ``k``, ``v``: ``[B, Nk, H·D]``. Returns ``(out [B, Nq, H·D], CachedMap)``.
    A ``mask`` always takes the reference path (diffusers UNets pass none to self/cross-attention).
    """
    if mask is None and map_dtype in _TRITON_DTYPES and _use_triton(backend, q, k, v):
        from .triton_ops import capture_triton
        return capture_triton(q, k, v, heads, scale, map_dtype)
    return capture_reference(q, k, v, heads, scale, map_dtype, mask)


def cached_pv(cmap: CachedMap, v: torch.Tensor, heads: int, backend: str = "auto") -> torch.Tensor:
    """``A · V`` for the cached map ``A``; ``v``: ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]`` in ``v.dtype``."""
    b, nk, hd = v.shape
    if cmap.shape[0] != b or cmap.shape[1] != heads or cmap.shape[3] != nk or hd % heads:
        raise ValueError(
            f"cached map of shape {tuple(cmap.shape)} cannot multiply values of shape {tuple(v.shape)} "
            f"with {heads} heads: the map belongs to another batch, resolution or layer")
    if _use_triton(backend, cmap.data, v):
        from .triton_ops import cached_pv_triton
        return cached_pv_triton(cmap, v, heads)
    return cached_pv_reference(cmap, v, heads)
