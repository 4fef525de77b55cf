"""Launch configurations: one per (kernel, head dim, query tokens, map format, architecture), by a rule.

Autotuning 16-24 configs per head dim and map dtype made the first patched SD1.5 call compile ~120 kernels
(minutes). The rule below gives each attention shape one config, so SD1.5 compiles a handful of kernels per
map format; Triton's cache keeps them between processes. Pipeline depth follows the format (smaller tiles
afford more stages: ``MapFormat.stages``) within the architecture's shared memory per block (sm_89 has 99 KB,
sm_90 227 KB). ``bench/sass_report.py`` checks every config the rule gives for SD1.5, SD2.1 and SDXL against
instruction, spill and load-width budgets; ``VARIANTS`` are the alternatives a GPU sweep times against it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

from .formats import KEY_BLOCK, MapFormat

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SHARED_PER_BLOCK = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes of shared memory a block may use
# Larger head dims take the PyTorch path: with 128-key tiles their accumulators and V fragments spill registers
# on sm_89 in every config tried; in SD1.5 they are the 16² and 8² levels (256 and 64 queries, maps of 1 MB).
MAX_HEAD_DIM = 128


@dataclass(frozen=True)
class Config:
    block_m: int
    num_warps: int
    num_stages: int
    split_d: bool = False  # a head dim that is no power of two as two dots (e.g. 80 = 64 + 16)

    def launch_args(self) -> dict:  # the kernels' key tile is one key block of the storage format
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


def _stages(wanted: int, stage_bytes: int, arch: int, kv_tokens: int) -> int:
    """At most ``wanted`` pipeline stages, as many as the architecture's shared memory holds (at least 1); one
    for rows of a single key block (cross-attention's 77 keys), where there is nothing to overlap."""
    if kv_tokens <= KEY_BLOCK:
        return 1
    room = SHARED_PER_BLOCK.get(arch, SHARED_PER_BLOCK[80]) - 8192  # leave room for layout conversions
    return max(1, min(wanted, room // stage_bytes))


def cached_pv_config(head_dim: int, q_tokens: int, kv_tokens: int, fmt: MapFormat, arch: int = 90) -> Config:
    """Reuse: a stream over the map. 128 query rows per tile (64 for layers of at most 64 queries) read V once
    per 128 rows. On Hopper at head dims up to 64, one warpgroup (4 warps) takes all 128 rows of fp16 and 4-bit
    maps, so each warp decodes 32 rows per key block and the loop's fixed work is spread over twice the map
    bytes; fp8 tiles decode into more registers (they spill at 4 warps on ragged row counts) and take 8, as do
    head dims of 80 and every tile on sm_89/sm_80 (mma.sync holds V fragments in registers too). Pipeline
    depth: 3 stages for fp16 tiles, one more for compressed formats' smaller tiles, within shared memory.
    Head dims that are no power of two run as two dots (``split_d``)."""
    if INTERPRET:
        return Config(16, 1, 1, split_d=True)
    block_m = 128 if q_tokens > 64 else 64
    warps = 4 if arch >= 90 and block_d(head_dim) <= 64 and fmt.bits != 8 else 8
    stage = block_m * KEY_BLOCK * fmt.bits // 8 + KEY_BLOCK * sum(split_block_d(head_dim)) * 2
    return Config(block_m, warps, _stages(3 + fmt.stages, stage, arch, kv_tokens), split_d=True)


def capture_config(head_dim: int, q_tokens: int, kv_tokens: int, fmt: MapFormat, arch: int = 90) -> Config:
    """Capture: flash-attention tiles of 128 keys; 128 queries over 8 warps for head dims up to 64 and more than
    1024 queries, else 64 queries over one warpgroup (4 warps: half the per-row work of 8 warps on 64 rows, and
    no spills on sm_89 at head dim 80); two stages where shared memory holds them; head dims that are no power
    of two as two dots."""
    if INTERPRET:
        return Config(16, 1, 1, split_d=True)
    big = q_tokens > 1024 and block_d(head_dim) <= 64
    stage = 2 * KEY_BLOCK * sum(split_block_d(head_dim)) * 2
    return Config(128 if big else 64, 8 if big else 4, _stages(2, stage, arch, kv_tokens), split_d=True)


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
        "no_split": lambda c: replace(c, split_d=False),
    },
    "capture": {
        "rule": lambda c: c,
        "m64": lambda c: replace(c, block_m=64),
        "warps/2": lambda c: replace(c, num_warps=max(4, c.num_warps // 2)),
        "stages+1": lambda c: replace(c, num_stages=c.num_stages + 1),
    },
}
