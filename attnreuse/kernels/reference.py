"""PyTorch reference implementations: attnreuse's CPU path and the oracle the Triton kernels are tested against.

Tensors use the layouts diffusers' projections produce and consume: ``q`` is ``[B, Nq, H·D]``, ``k`` and
``v`` are ``[B, Nk, H·D]``, outputs are ``[B, Nq, H·D]`` (what ``to_out`` takes).
"""
from __future__ import annotations

import torch

from .storage import CachedMap


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D]`` -> ``[B, H, N, D]`` (a view)."""
    b, n, hd = x.shape
    return x.view(b, n, heads, hd // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, D]`` -> ``[B, N, H·D]``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attention_probs(q, k, heads: int, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(Q Kᵀ · scale + mask)`` as ``[B, H, Nq, Nk]`` in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(split_heads(q, heads).to(dtype), split_heads(k, heads).to(dtype).transpose(-1, -2))
    scores = scores * scale
    if mask is not None:
        scores = scores + mask.to(dtype)
    return scores.softmax(dim=-1)


def capture_reference(q, k, v, heads: int, scale: float, map_format, mask=None):
    """Attention output (in ``v.dtype``) and its map in ``map_format`` (anything ``formats.get`` takes)."""
    probs = attention_probs(q, k, heads, scale, mask)
    out = torch.matmul(probs.to(v.dtype), split_heads(v, heads))
    return merge_heads(out), CachedMap.from_probs(probs, map_format)


def cached_pv_reference(cmap: CachedMap, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``A · V`` for a cached map ``A``, in ``v.dtype`` and layout ``[B, Nq, H·D]``.

    Accumulates in fp32 (fp64 for fp64 maps or values), as the kernels do: a stored block is relative to its
    own maximum, so its normalisation happens in the per-block factor, outside the low-precision operands."""
    acc = torch.promote_types(torch.promote_types(v.dtype, torch.float32), cmap.block_max.dtype)
    out = torch.matmul(cmap.dequantize(acc), split_heads(v, heads).to(acc))
    return merge_heads(out.to(v.dtype))
