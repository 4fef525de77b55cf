"""The Triton kernels as ``torch.library`` custom ops (so ``torch.compile`` and CUDA graphs see them), and their
launches. Inputs are checked once, in :mod:`.ops`; here they are only laid out for the kernels: ``[B, N, H·D]``
seen as ``[B, N, H, D]`` through strides, head dims masked up to a power of two. fp8 and fp4 maps cross the
op boundary as uint8 bytes (``CachedMap.data.view(torch.uint8)``) with their ``map_dtype``: PyTorch's CPU
kernels, which the op checks run, know no arithmetic on them.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .storage import FP4, FP8, data_shape, num_blocks, top
from .tuning import Config, block_d, cached_pv_config, capture_config, split_block_d

_BYTES = (FP8, FP4)  # stored as raw bytes


def _dot_dtype(*dtypes: torch.dtype):
    """Matmul inputs: fp32 if anything is fp32, else bf16 if the values are bf16, else fp16."""
    if torch.float32 in dtypes:
        return tl.float32, "ieee"
    return (tl.bfloat16 if torch.bfloat16 in dtypes else tl.float16), "tf32"


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D]`` -> ``[B, N, H, D]`` with a unit stride along D."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def _as_bytes(data: torch.Tensor, map_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.dtype]:
    """``(data as the kernels read it, the map dtype)``: fp8/fp4 maps as uint8 (then ``map_dtype`` says which)."""
    if data.dtype in _BYTES:
        return data.view(torch.uint8), data.dtype
    if data.dtype == torch.uint8 and map_dtype not in _BYTES:
        raise ValueError(f"uint8 map data needs map_dtype FP8 or FP4, got {map_dtype}")
    return data, map_dtype or data.dtype


def launch_cached_pv(out, data, block_max, row_lse, v, heads: int, map_dtype: torch.dtype | None = None,
                     config: Config | None = None) -> None:
    """``out`` ``[B, Nq, H·D]`` = the map (``data``, ``block_max``, ``row_lse``) times ``v`` ``[B, Nk, H·D]``.
    ``data``: fp32/fp16/bf16, FP8 or FP4, or the uint8 bytes of the last two with their ``map_dtype``."""
    data, map_dtype = _as_bytes(data, map_dtype)
    b, h, nq, _ = data.shape
    nk = v.shape[1]
    v4 = _heads_view(v, heads)
    d = v4.shape[-1]
    o4 = out.view(b, nq, h, d)
    config = config or cached_pv_config(d, nq, map_dtype)
    shift = 2.0 ** 8 if map_dtype == FP8 and not config.native_fp8 else 1.0  # see tk's docstring
    dot_dtype, precision = _dot_dtype(v.dtype, torch.float16 if map_dtype in _BYTES else map_dtype)
    split = split_block_d(d) if config.split_d else (block_d(d), 0)
    tk.cached_pv_kernel[(triton.cdiv(nq, config.block_m), b * h)](
        data, block_max, row_lse, v4, o4,
        data.stride(0), data.stride(1), data.stride(2), block_max.stride(0), block_max.stride(1), block_max.stride(2),
        row_lse.stride(0), row_lse.stride(1),
        v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        h, nq, nk, d,
        OUT_SCALE=shift / top(map_dtype), FP8_BYTES=map_dtype == FP8, NATIVE_FP8=config.native_fp8,
        FP4_PACKED=map_dtype == FP4, DOT_DTYPE=dot_dtype, PRECISION=precision,
        **dict(zip(("BLOCK_D", "BLOCK_D2"), split)), **config.launch_args())


def launch_capture(out, data, block_max, row_lse, q, k, v, heads: int, scale: float,
                   map_dtype: torch.dtype | None = None, config: Config | None = None) -> None:
    """Attention of ``q``, ``k``, ``v`` into ``out``, its map into ``data`` (as for :func:`launch_cached_pv`),
    ``block_max``, ``row_lse``."""
    q4, k4, v4 = (_heads_view(x, heads) for x in (q, k, v))
    b, nq, h, d = q4.shape
    nk = k4.shape[1]
    o4 = out.view(b, nq, h, d)
    data, map_dtype = _as_bytes(data, map_dtype)
    config = config or capture_config(d, nq, map_dtype)
    dot_dtype, precision = _dot_dtype(q.dtype, k.dtype, v.dtype)
    tk.capture_kernel[(triton.cdiv(nq, config.block_m), b * h)](
        q4, k4, v4, o4, data, block_max, row_lse,
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
        v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        data.stride(0), data.stride(1), data.stride(2), block_max.stride(0), block_max.stride(1), block_max.stride(2),
        row_lse.stride(0), row_lse.stride(1),
        scale * math.log2(math.e), h, nq, nk, d,
        FP8_BYTES=map_dtype == FP8, FP4_PACKED=map_dtype == FP4, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_D=block_d(d), **config.launch_args())


@torch.library.custom_op("attnreuse::cached_pv", mutates_args=())
def cached_pv_op(data: torch.Tensor, block_max: torch.Tensor, row_lse: torch.Tensor, v: torch.Tensor,
                 heads: int, map_dtype: torch.dtype) -> torch.Tensor:
    """A cached map (the three tensors of :class:`.CachedMap`, fp8/fp4 data as uint8) times ``v``
    ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]``."""
    out = v.new_empty(v.shape[0], data.shape[2], v.shape[2])
    launch_cached_pv(out, data, block_max, row_lse, v, heads, map_dtype)
    return out


@cached_pv_op.register_fake
def _(data, block_max, row_lse, v, heads, map_dtype):
    return v.new_empty(v.shape[0], data.shape[2], v.shape[2])


def capture_buffers(q, k, v, heads: int, map_dtype: torch.dtype):
    """Uninitialised ``(out, data, block_max, row_lse)`` for a capture (fp8/fp4 data as uint8)."""
    b, nq, hd = q.shape
    nk = k.shape[1]
    data_dtype = torch.uint8 if map_dtype in _BYTES else map_dtype
    return (v.new_empty(b, nq, v.shape[2]), q.new_empty(data_shape(b, heads, nq, nk, map_dtype), dtype=data_dtype),
            q.new_empty(b, heads, num_blocks(nk), nq, dtype=torch.float32),
            q.new_empty(b, heads, nq, dtype=torch.float32))


@torch.library.custom_op("attnreuse::capture", mutates_args=())
def capture_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
               map_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Nq, H·D], data [B, H, Nq, Nk] (fp8/fp4 as uint8, see :mod:`.storage`),
    block_max [B, H, NB, Nq], row_lse [B, H, Nq])``."""
    bufs = capture_buffers(q, k, v, heads, map_dtype)
    launch_capture(*bufs, q, k, v, heads, scale, map_dtype)
    return bufs


@capture_op.register_fake
def _(q, k, v, heads, scale, map_dtype):
    return capture_buffers(q, k, v, heads, map_dtype)
