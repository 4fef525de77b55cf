"""Launch configurations: one per (kernel, head dim, query tokens, map dtype), chosen by a rule, no autotuning.

Autotuning 16-24 configs per head dim and map dtype made the first patched SD1.5 call compile ~120 kernels
(minutes). The rule below gives each attention shape one config, so SD1.5 compiles a handful of kernels per
map dtype (head dims 40/80/160 → BLOCK_D 64/128/256, self- and cross-attention key counts); Triton's cache
keeps them between processes. Why each number: bench/KERNEL_NOTES.md. ``VARIANTS`` are the alternatives a
GPU sweep (``bench/kernel_table.py --sweep``) times against the rule.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from .storage import FP4, FP8, KEY_BLOCK

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Config:
    block_m: int
    num_warps: int
    num_stages: int
    native_fp8: bool = False  # fp8 bytes -> fp16 by the hardware conversion instead of the bit shift
    split_d: bool = False  # cached_pv: a head dim that is no power of two as two dots (e.g. 80 = 64 + 16)

    def launch_args(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_N=KEY_BLOCK, num_warps=self.num_warps, num_stages=self.num_stages)


def block_d(head_dim: int) -> int:
    """Head dims are padded (and masked) up to a power of two, at least 16 (the smallest dot)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def split_block_d(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D, BLOCK_D2)``: the largest power of two in the head dim and the rest padded to one (0 if
    none): 40 -> (32, 16), 80 -> (64, 16), 160 -> (128, 32), 64 -> (64, 0)."""
    first = max(16, 1 << (head_dim.bit_length() - 1))
    rest = head_dim - first
    return (first, 0) if rest <= 0 else (first, block_d(rest))


def cached_pv_config(head_dim: int, q_tokens: int, map_dtype: torch.dtype) -> Config:
    """Reuse: a stream over the map. Rows of 128 queries halve V re-reads against 64 (one V pass per row
    tile); few query tokens take 64 rows so a batch-2 layer still fills the GPU. Deep pipelines keep loads
    in flight: fp8/fp4 tiles are half (a quarter) of the bytes of fp16 ones: one more stage in the same memory.
    Head dims that are no power of two run as two dots (``split_d``) instead of one padded dot."""
    if INTERPRET:
        return Config(16, 1, 1, split_d=True)
    bd = block_d(head_dim)
    fp8 = map_dtype in (FP8, FP4)
    if bd >= 256:
        return Config(64, 8, 2, split_d=True)
    block_m = 64 if q_tokens <= 1024 else 128
    warps = 4 if block_m == 64 else 8
    if bd == 128:
        return Config(block_m, 8, 3 if fp8 else 2, split_d=True)
    return Config(block_m, warps, 4 if fp8 else 3, split_d=True)


def capture_config(head_dim: int, q_tokens: int, map_dtype: torch.dtype) -> Config:
    """Capture: flash-attention tiles (128 queries × 128 keys for head dims up to 128, 64 × 128 above, where
    K and V tiles of 256 columns leave shared memory for one stage only)."""
    if INTERPRET:
        return Config(16, 1, 1)
    if block_d(head_dim) >= 256:
        return Config(64, 8, 1)
    return Config(64 if q_tokens <= 1024 else 128, 8, 2)


RULES = {"cached_pv": cached_pv_config, "capture": capture_config}

# Named alternatives to the rule, for a sweep on the device: f(rule config) -> config.
VARIANTS = {
    "cached_pv": {
        "rule": lambda c: c,
        "m64": lambda c: replace(c, block_m=64),
        "m256_w8": lambda c: replace(c, block_m=256, num_warps=8),
        "stages+1": lambda c: replace(c, num_stages=c.num_stages + 1),
        "stages-1": lambda c: replace(c, num_stages=max(1, c.num_stages - 1)),
        "warps*2": lambda c: replace(c, num_warps=2 * c.num_warps),
        "native_fp8": lambda c: replace(c, native_fp8=True),
        "no_split": lambda c: replace(c, split_d=False),
    },
    "capture": {
        "rule": lambda c: c,
        "m64": lambda c: replace(c, block_m=64),
        "warps/2": lambda c: replace(c, num_warps=max(4, c.num_warps // 2)),
        "stages+1": lambda c: replace(c, num_stages=c.num_stages + 1),
    },
}
