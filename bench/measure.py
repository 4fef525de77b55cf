"""What the kernel benchmarks measure with: the attention shapes they time, Triton's timer and the
copy bandwidth every kernel is compared with."""
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
