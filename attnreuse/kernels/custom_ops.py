"""The Triton kernels as ``torch.library`` custom ops, so that ``torch.compile`` and CUDA graphs see them, and the
functions behind them, which eager calls use directly (an op dispatch costs host time an eager UNet cannot hide).
Inputs are checked once, in :mod:`.api`; the map format crosses the ops as its registry name, and fp8 and 4-bit
maps as uint8 bytes (``MapFormat.op_dtype``). ``cached_pv`` and ``capture`` are the eager functions (a capture's
map in one buffer, which the ops' outputs may not share).
"""
from __future__ import annotations

import torch

from . import formats
from .launchers import cached_pv_eager as cached_pv
from .launchers import cached_pv_new, capture_buffers, capture_new, empty_rows
from .launchers import capture_eager as capture


@torch.library.custom_op("attnreuse::cached_pv", mutates_args=())
def cached_pv_op(data: torch.Tensor, block_max: torch.Tensor, row_lse: torch.Tensor, v: torch.Tensor,
                 heads: int, map_format: str) -> torch.Tensor:
    """A cached map (the three tensors of :class:`.CachedMap`, fp8/4-bit data as uint8) in format
    ``map_format`` times ``v`` ``[B, Nk, H·D]`` -> ``[B, Nq, H·D]``."""
    return cached_pv_new(data, block_max, row_lse, v, heads, formats.get(map_format))


@cached_pv_op.register_fake
def _(data, block_max, row_lse, v, heads, map_format):
    return empty_rows(v.shape[0], data.shape[2], v.shape[2], v.dtype, v.device)


@torch.library.custom_op("attnreuse::capture", mutates_args=())
def capture_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, scale: float,
               map_format: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(out [B, Nq, H·D], data [B, H, Nq, items] (fp8/4-bit as uint8, see :mod:`.storage`),
    block_max [B, H, NB, Nq], row_lse [B, H, Nq])``."""
    return capture_new(q, k, v, heads, scale, formats.get(map_format))


@capture_op.register_fake
def _(q, k, v, heads, scale, map_format):
    return capture_buffers(q, k, v, heads, map_format)
