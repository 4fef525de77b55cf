"""The Triton kernels as ``torch.library`` custom ops (so ``torch.compile`` and CUDA graphs see them), and their
launches. Inputs are checked once, in :mod:`.api`; here they are only laid out for the kernels: ``[B, N, H·D]``
rows whose strides are whole 16-byte units (anything else is first copied into such a buffer), the map format
as its registry name. fp8 and 4-bit maps cross the op boundary as uint8 bytes (``MapFormat.op_dtype``).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from triton.runtime import driver

from . import formats
from . import triton_kernels as tk
from .formats import KEY_BLOCK, num_blocks
from .storage import data_shape
from .tuning import INTERPRET, Config, block_d, cached_pv_config, capture_config, split_block_d

ALIGN = 16  # bytes


def target_arch() -> int:
    """The compute capability Triton compiles for (``90`` for sm_90a): the config rule and decodes depend on it.
    0 under the interpreter, which has no target: its decodes take the integer paths (its fp32 -> fp8
    rounding drops the carry into the exponent)."""
    if INTERPRET:
        return 0
    active = driver.active  # bench/sass.py swaps in a fake driver per target
    return _arch(active, active.get_current_device())


@functools.cache  # per driver and device, as Triton's JIT keeps its targets
def _arch(active, device) -> int:
    return active.get_current_target().arch


def _units(stride: int, item: int) -> int:
    """A stride in 16-byte units (the kernels multiply back, so the compiler sees a multiple of 16 bytes)."""
    assert stride * item % ALIGN == 0, "caller guarantees 16-byte strides"
    return stride * item // ALIGN


def aligned_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, N, W]`` itself if its rows are 16-byte aligned with a unit stride along W, else a copy in a
    buffer whose rows are padded to 16 bytes (the kernels read whole 16-byte vectors)."""
    item = x.element_size()
    if (x.stride(-1) == 1 and x.data_ptr() % ALIGN == 0 and all(s * item % ALIGN == 0 for s in x.stride()[:2])):
        return x
    out = empty_rows(*x.shape, dtype=x.dtype, device=x.device)
    return out.copy_(x)


def empty_rows(b: int, n: int, w: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised ``[B, N, W]`` tensor whose rows start 16-byte aligned (padded when ``W`` needs it)."""
    per = ALIGN // dtype.itemsize
    padded = -(-w // per) * per
    buf = torch.empty(b, n, padded, dtype=dtype, device=device)
    return buf if padded == w else buf[..., :w]


def _items(data: torch.Tensor, fmt: formats.MapFormat) -> torch.Tensor:
    """``data`` as the kernels read it (``fmt.op_dtype``); the ops pass it so already."""
    return data if data.dtype == fmt.op_dtype else data.view(fmt.op_dtype)


def _constexprs(rule, config: Config | None, fmt: formats.MapFormat, d: int, nq: int, nk: int, dtypes: tuple) -> dict:
    """The constexprs and launch options of a launch: by ``config``, else by ``rule``'s config, cached (they
    depend on nothing but the shape, format, activation dtypes and target; the dict is shared: read only)."""
    if config is None:
        return _rule_constexprs(rule, fmt, d, nq, nk, dtypes, target_arch())
    return _config_constexprs(config, fmt, d, nq, nk, dtypes, target_arch())


@functools.cache
def _rule_constexprs(rule, fmt: formats.MapFormat, d: int, nq: int, nk: int, dtypes: tuple, arch: int) -> dict:
    return _config_constexprs(rule(d, nq, nk, fmt, arch), fmt, d, nq, nk, dtypes, arch)


def _config_constexprs(config: Config, fmt: formats.MapFormat, d: int, nq: int, nk: int, dtypes: tuple,
                       arch: int) -> dict:
    block_ds = split_block_d(d) if config.split_d else (block_d(d), 0)
    return dict(HEAD_DIM=d, MAP_FORMAT=fmt.kernel, FRAGMENT=fmt.in_fragment_order(nk),
                FP8_CVT=arch >= 89,  # hardware e4m3/e5m2 conversions
                DOT_DTYPE=tl.bfloat16 if torch.bfloat16 in dtypes else tl.float16,  # bf16 with bf16 values or map
                EVEN_M=nq % config.block_m == 0, EVEN_N=nk % KEY_BLOCK == 0,
                BLOCK_D=block_ds[0], BLOCK_D2=block_ds[1], **config.launch_args())


def launch_cached_pv(out, data, block_max, row_lse, v, heads: int, fmt, config: Config | None = None) -> None:
    """``out`` ``[B, Nq, H·D]`` = the map (``data``, ``block_max``, ``row_lse``) in format ``fmt`` times ``v``
    ``[B, Nk, H·D]``. ``data``: in the format's dtype, or its uint8 bytes."""
    fmt = formats.get(fmt)
    data = _items(data, fmt)
    b, h, nq, items = data.shape
    nk = v.shape[1]
    d = v.shape[2] // heads
    v = aligned_rows(v)
    meta = _constexprs(cached_pv_config, config, fmt, d, nq, nk, (v.dtype, fmt.dtype))
    a_item, v_item, o_item = data.element_size(), v.element_size(), out.element_size()
    tk.cached_pv_kernel[(triton.cdiv(nq, meta["BLOCK_M"]), b * h)](
        data, block_max, row_lse, v, out,
        _units(data.stride(0), a_item), _units(data.stride(1), a_item), _units(data.stride(2), a_item),
        block_max.stride(0), block_max.stride(1), row_lse.stride(0), row_lse.stride(1),
        _units(v.stride(0), v_item), _units(v.stride(1), v_item), _units(out.stride(0), o_item),
        _units(out.stride(1), o_item), h, nq, nk, items,
        INV_TOP=1.0 / fmt.top, ASM=not INTERPRET, **meta)


def launch_capture(out, data, block_max, row_lse, q, k, v, heads: int, scale: float, fmt,
                   config: Config | None = None) -> None:
    """Attention of ``q``, ``k``, ``v`` into ``out``, its map in format ``fmt`` into ``data`` (as for
    :func:`launch_cached_pv`), ``block_max``, ``row_lse``."""
    fmt = formats.get(fmt)
    data = _items(data, fmt)
    q, k, v = (aligned_rows(x) for x in (q, k, v))
    b, nq, hd = q.shape
    d = hd // heads
    nk = k.shape[1]
    meta = _constexprs(capture_config, config, fmt, d, nq, nk, (q.dtype, k.dtype, v.dtype))
    a_item = data.element_size()
    tk.capture_kernel[(triton.cdiv(nq, meta["BLOCK_M"]), b * heads)](
        q, k, v, out, data, block_max, row_lse,
        *(_units(x.stride(i), x.element_size()) for x in (q, k, v, out) for i in (0, 1)),
        _units(data.stride(0), a_item), _units(data.stride(1), a_item), _units(data.stride(2), a_item),
        block_max.stride(0), block_max.stride(1), row_lse.stride(0), row_lse.stride(1),
        scale * math.log2(math.e), heads, nq, nk, data.shape[-1],
        TOP=fmt.top, STORED_SUMS=fmt.stored_sums, **meta)


@torch.library.custom_op("attnreuse::cached_pv", mutates_args=())
def cached_pv_op(data: torch.Tensor, block_max: torch.Tensor, row_lse: torch.Tensor, v: torch.Tensor,
                 heads: int, map_format: str) -> torch.Tensor:
    """A cached map (the three tensors of :class:`.CachedMap`, fp8/4-bit data as uint8) in format
    ``map_format`` times ``v`` ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]``."""
    out = empty_rows(v.shape[0], data.shape[2], v.shape[2], v.dtype, v.device)
    launch_cached_pv(out, data, block_max, row_lse, v, heads, map_format)
    return out


@cached_pv_op.register_fake
def _(data, block_max, row_lse, v, heads, map_format):
    return empty_rows(v.shape[0], data.shape[2], v.shape[2], v.dtype, v.device)


def capture_buffers(q, k, v, heads: int, fmt):
    """Uninitialised ``(out, data, block_max, row_lse)`` for a capture (fp8/4-bit data as uint8)."""
    fmt = formats.get(fmt)
    b, nq, _ = q.shape
    nk = k.shape[1]
    return (empty_rows(b, nq, v.shape[2], v.dtype, v.device),
            q.new_empty(data_shape(b, heads, nq, nk, fmt), dtype=fmt.op_dtype),
            q.new_empty(b, heads, num_blocks(nk), nq, dtype=torch.float32),
            q.new_empty(b, heads, nq, dtype=torch.float32))


@torch.library.custom_op("attnreuse::capture", mutates_args=())
def capture_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
               map_format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Nq, H·D], data [B, H, Nq, items] (fp8/4-bit as uint8, see :mod:`.storage`),
    block_max [B, H, NB, Nq], row_lse [B, H, Nq])``."""
    fmt = formats.get(map_format)
    bufs = capture_buffers(q, k, v, heads, fmt)
    launch_capture(*bufs, q, k, v, heads, scale, fmt)
    return bufs


@capture_op.register_fake
def _(q, k, v, heads, scale, map_format):
    return capture_buffers(q, k, v, heads, map_format)

