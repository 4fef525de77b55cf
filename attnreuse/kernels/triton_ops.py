"""The Triton kernels as ``torch.library`` custom ops (so ``torch.compile`` and CUDA graphs see them).

Input normalisation lives here, once: head dims of any size (the kernels mask up to the next power of
two), any strides with a unit stride along the head dim, fp8 maps passed as bytes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .storage import FP8, CachedMap

_DOT = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
VALUE_DTYPES = tuple(_DOT)


def _dot_dtype(*dtypes: torch.dtype):
    """Matmul inputs: fp32 if anything is fp32, else bf16 if the values are bf16, else fp16."""
    if torch.float32 in dtypes:
        return tl.float32, "ieee"
    return (tl.bfloat16 if torch.bfloat16 in dtypes else tl.float16), "tf32"


def _heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H·D]`` -> ``[B, N, H, D]`` with a unit stride along D."""
    if x.dim() != 3 or x.shape[-1] % heads:
        raise ValueError(f"expected [batch, tokens, heads*head_dim] with {heads} heads, got {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.unflatten(-1, (heads, x.shape[-1] // heads))


def _check_values(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in VALUE_DTYPES:
            raise TypeError(f"Triton kernels take fp16, bf16 or fp32 activations, got {t.dtype}; "
                            "use backend='torch' for other dtypes")


def _grid(nq: int, bh: int):
    return lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), bh)


def cached_pv_into(out: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, v: torch.Tensor,
                   heads: int) -> None:
    """Launch ``cached_pv`` writing into ``out`` ``[B, Nq, H·D]``; ``data`` fp8 maps as uint8 bytes with
    their row ``scale``, other maps with ``scale=None``."""
    b, h, nq, nk = data.shape
    v4 = _heads_view(v, heads)
    d = v4.shape[-1]
    o4 = out.view(b, nq, h, d)
    is_fp8 = data.dtype == torch.uint8
    dot_dtype, precision = _dot_dtype(v.dtype, torch.float16 if is_fp8 else data.dtype)
    sb, sh = (scale.stride(0), scale.stride(1)) if is_fp8 else (0, 0)
    tk.cached_pv[_grid(nq, b * h)](
        data, scale if is_fp8 else data, v4, o4,  # without fp8 the scale pointer is never read
        data.stride(0), data.stride(1), data.stride(2), sb, sh,
        v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        h, nq, nk, d,
        IS_FP8=is_fp8, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_D=max(16, triton.next_power_of_2(d)), **tk.FIXED_CONFIG)


@torch.library.custom_op("attnreuse::cached_pv", mutates_args=())
def cached_pv_op(data: torch.Tensor, scale: torch.Tensor | None, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``data``: map ``[B, H, Nq, Nk]`` (fp8 as uint8 bytes); ``scale``: ``[B, H, Nq]`` fp32 for fp8, else None."""
    out = v.new_empty(v.shape[0], data.shape[2], v.shape[2])
    cached_pv_into(out, data, scale, v, heads)
    return out


@cached_pv_op.register_fake
def _(data, scale, v, heads):
    return v.new_empty(v.shape[0], data.shape[2], v.shape[2])


def capture_into(out, amap, rscale, q, k, v, heads: int, scale: float) -> None:
    """Launch ``capture`` writing ``out`` ``[B, Nq, H·D]``, ``amap`` ``[B, H, Nq, Nk]`` (uint8 for fp8) and,
    for fp8, ``rscale`` ``[B, H, Nq]``."""
    q4, k4, v4 = (_heads_view(x, heads) for x in (q, k, v))
    b, nq, h, d = q4.shape
    nk = k4.shape[1]
    o4 = out.view(b, nq, h, d)
    is_fp8 = amap.dtype == torch.uint8
    sb, sh = (rscale.stride(0), rscale.stride(1)) if is_fp8 else (0, 0)
    dot_dtype, precision = _dot_dtype(q.dtype, k.dtype, v.dtype)
    tk.capture[_grid(nq, b * h)](
        q4, k4, v4, o4, amap, rscale,
        q4.stride(0), q4.stride(1), q4.stride(2), k4.stride(0), k4.stride(1), k4.stride(2),
        v4.stride(0), v4.stride(1), v4.stride(2), o4.stride(0), o4.stride(1), o4.stride(2),
        amap.stride(0), amap.stride(1), amap.stride(2), sb, sh,
        scale * math.log2(math.e), h, nq, nk, d,
        IS_FP8=is_fp8, DOT_DTYPE=dot_dtype, PRECISION=precision,
        BLOCK_D=max(16, triton.next_power_of_2(d)), **tk.FIXED_CONFIG)


def _capture_buffers(q, k, v, heads: int, map_dtype: torch.dtype):
    b, nq, hd = q.shape
    is_fp8 = map_dtype == FP8
    out = v.new_empty(b, nq, hd)
    amap = q.new_empty(b, heads, nq, k.shape[1], dtype=torch.uint8 if is_fp8 else map_dtype)
    rscale = q.new_empty((b, heads, nq) if is_fp8 else (0,), dtype=torch.float32)
    return out, amap, rscale


@torch.library.custom_op("attnreuse::capture", mutates_args=())
def capture_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
               map_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Nq, H·D], map [B, H, Nq, Nk] (fp8 as uint8), row scales [B, H, Nq] or empty)``."""
    out, amap, rscale = _capture_buffers(q, k, v, heads, map_dtype)
    capture_into(out, amap, rscale, q, k, v, heads, scale)
    return out, amap, rscale


@capture_op.register_fake
def _(q, k, v, heads, scale, map_dtype):
    return _capture_buffers(q, k, v, heads, map_dtype)


def cached_pv_triton(cmap: CachedMap, v: torch.Tensor, heads: int) -> torch.Tensor:
    """``A · V`` with the Triton kernel; ``v``: ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]``."""
    _check_values(v)
    if cmap.dtype == torch.float64:
        raise TypeError("Triton kernels do not take fp64 maps; use backend='torch'")
    data = cmap.data.view(torch.uint8) if cmap.dtype == FP8 else cmap.data
    return cached_pv_op(data, cmap.scale, v, heads)


def capture_triton(q, k, v, heads: int, scale: float, map_dtype: torch.dtype):
    """Attention output and its map (see :func:`attnreuse.kernels.capture`) with the Triton kernel."""
    _check_values(q, k, v)
    if map_dtype not in (FP8,) + VALUE_DTYPES:
        raise TypeError(f"Triton kernels store maps as fp8, fp16, bf16 or fp32, not {map_dtype}")
    out, amap, rscale = capture_op(q, k, v, heads, float(scale), map_dtype)
    if map_dtype == FP8:
        return out, CachedMap(amap.view(FP8), rscale)
    return out, CachedMap(amap, None)
