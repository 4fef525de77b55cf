"""What the benchmarks measure with: the attention shapes they time, the schedules and DeepCache setting they
run, Triton's timer and the copy bandwidth every kernel is compared with."""
from __future__ import annotations

import torch

from attnreuse.timing import median_ms

# (batch, heads, q tokens, kv tokens, head dim) of SD1.5 / SDXL attention layers with CFG (batch 2)
SHAPES = {
    "sd15_64x64_self": (2, 8, 4096, 4096, 40),
    "sd15_32x32_self": (2, 8, 1024, 1024, 80),
    "sd15_64x64_cross": (2, 8, 4096, 77, 40),
    "sdxl_64x64_self": (2, 10, 4096, 4096, 64),
    "sdxl_32x32_self": (2, 20, 1024, 1024, 64),
    "sd15_1024px_self": (2, 8, 16384, 16384, 40),
}

FORMAT_TAGS = {"16": "fp16", "8": "fp8", "4": "fp4"}  # the kernel table's column tags: pv16, capture8, ...
PHAST_SD15 = "11111111010001000000"  # the paper's PHAST-10 for SD1.5, 20-step DDIM
DEEPCACHE_INTERVAL = 3


def deepcache(pipe, interval: int = DEEPCACHE_INTERVAL):
    """DeepCache (the ``DeepCache`` package) enabled on ``pipe`` (anything with a ``.unet``) at ``interval``,
    caching the shallowest branch: returns its helper (``helper.disable()`` undoes it)."""
    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    helper.enable()
    return helper


def bench_ms(fn) -> float:
    """Median milliseconds of a GPU kernel with Triton's ``do_bench`` (flushes L2 between runs)."""
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device: torch.device | str = "cuda") -> float:
    """Device-to-device copy of 1 GiB, in bytes read + written per second: the bandwidth ceiling."""
    src = torch.empty(2 ** 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src)) if src.is_cuda else median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3)
