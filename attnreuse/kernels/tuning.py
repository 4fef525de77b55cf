"""Launch configurations: one per (kernel, head dim, query tokens, map format, architecture), by a rule.

Autotuning 16-24 configs per head dim and map dtype made the first patched SD1.5 call compile ~120 kernels
(minutes). The rule below gives each attention shape one config, so SD1.5 compiles a handful of kernels per
map format; Triton's cache keeps them between processes. Pipeline depth follows the format (smaller tiles
afford more stages: ``MapFormat.stages``) within the architecture's shared memory per block (sm_89 has 99 KB,
sm_90 227 KB). ``bench/launches.py`` compiles every launch the rule gives SD1.5, SD2.1 and SDXL UNets, for
sm_90a, sm_89 and sm_80 under Triton 3.6 and the newest, and reads spills, load widths and uninitialised
registers from the SASS; ``VARIANTS`` are the alternatives a GPU sweep times against it.
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
    """At most ``wanted`` pipeline stages, as many as the architecture's shared memory holds (at least 1); two
    for rows of a single key block (cross-attention's 77 keys): nothing to overlap, but a split head dim needs a
    pipelined loop (:func:`_split_if_pipelined`)."""
    if kv_tokens <= KEY_BLOCK:
        wanted = 2
    room = SHARED_PER_BLOCK.get(arch, SHARED_PER_BLOCK[80]) - 8192  # leave room for layout conversions
    return max(1, min(wanted, room // stage_bytes))


def cached_pv_config(head_dim: int, q_tokens: int, kv_tokens: int, fmt: MapFormat, arch: int = 90) -> Config:
    """Reuse: a stream over the map. 128 query rows per tile (64 for layers of at most 64 queries) read V once
    per 128 rows. On Hopper at head dims up to 64, one warpgroup (4 warps) takes all 128 rows of fp16 and 4-bit
    maps, so each warp decodes 32 rows per key block and the loop's fixed work is spread over twice the map
    bytes; fp8 tiles decode into more registers (they spill at 4 warps on ragged row counts) and take 8, as do
    head dims of 80, rows that end in a partial key block (their masks spill at 4 warps with Triton 3.6's ptxas)
    and every tile on sm_89/sm_80 (mma.sync holds V fragments in registers too); 64 rows where 128 leave room
    for one stage only (fp16 maps on sm_89). Pipeline depth: 3 stages for fp16 tiles, one more for compressed
    formats' smaller tiles, within shared memory. Head dims that are no power of two run as two dots (``split_d``)
    in pipelined loops."""
    if INTERPRET:
        return Config(16, 1, 1, split_d=True)
    block_m = 128 if q_tokens > 64 else 64
    whole = kv_tokens % KEY_BLOCK == 0
    warps = 4 if arch >= 90 and block_d(head_dim) <= 64 and fmt.bits != 8 and whole else 8

    def stages(rows: int) -> int:
        tile = rows * KEY_BLOCK * fmt.bits // 8 + KEY_BLOCK * sum(split_block_d(head_dim)) * 2
        return _stages(3 + fmt.stages, tile, arch, kv_tokens)

    if stages(block_m) < 2:
        block_m = 64
    return _split_if_pipelined(Config(block_m, warps, stages(block_m), split_d=True))


def capture_config(head_dim: int, q_tokens: int, kv_tokens: int, fmt: MapFormat, arch: int = 90) -> Config:
    """Capture: flash-attention tiles of 128 keys; 128 queries over 8 warps for head dims up to 64, more than
    1024 queries and whole key blocks, else 64 queries over one warpgroup (4 warps: half the per-row work of 8
    warps on 64 rows), or over 8 warps where rows end in a partial key block (the masked encode spills at 4 warps
    with Triton 3.6's ptxas); two stages where shared memory holds them; head dims that are no power of two as
    two dots in pipelined loops. bench/launches.py compiles every launch of SD1.5, SD2.1 and SDXL for sm_90a,
    sm_89 and sm_80: no spills on sm_90a with Triton 3.6 or 3.9, at most 64 bytes on sm_89."""
    if INTERPRET:
        return Config(16, 1, 1, split_d=True)
    whole = kv_tokens % KEY_BLOCK == 0
    big = q_tokens > 1024 and block_d(head_dim) <= 64 and whole
    stage = 2 * KEY_BLOCK * sum(split_block_d(head_dim)) * 2
    warps = 8 if big or not whole else 4
    return _split_if_pipelined(Config(128 if big else 64, warps, _stages(2, stage, arch, kv_tokens), split_d=True))


def _split_if_pipelined(config: Config) -> Config:
    """Split head dims (two dots) only in pipelined loops. ptxas 12.8 (Triton 3.6) builds the wgmma descriptors of
    the second dot of a one-stage loop from registers nothing wrote (wrong output or an illegal address in
    cross-attention at d = 40 and 80 on Hopper); two stages split, or one stage unsplit, compile clean with every
    ptxas in the supported range (bench/launches.py scans every launch)."""
    return replace(config, split_d=config.split_d and config.num_stages > 1)


RULES = {"cached_pv": cached_pv_config, "capture": capture_config}

# Named alternatives to the rule, for a sweep on the device: f(rule config) -> config (a split head dim kept to
# pipelined loops, as in the rule).
_VARIANTS = {
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
VARIANTS = {kernel: {name: (lambda c, f=f: _split_if_pipelined(f(c))) for name, f in fs.items()}
            for kernel, fs in _VARIANTS.items()}
