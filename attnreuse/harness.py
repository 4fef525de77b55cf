"""Measuring on a device, in one place for the planner, the benchmarks and the GPU check: timers, copy
bandwidth, CUDA-graph capture, and the attention shapes the kernel benchmarks use."""
from __future__ import annotations

import time

import torch

# (batch, heads, q tokens, kv tokens, head dim) of SD1.5 / SDXL attention layers with CFG (batch 2)
SHAPES = {
    "sd15_64x64_self": (2, 8, 4096, 4096, 40),
    "sd15_32x32_self": (2, 8, 1024, 1024, 80),
    "sd15_64x64_cross": (2, 8, 4096, 77, 40),
    "sdxl_64x64_self": (2, 10, 4096, 4096, 64),
    "sdxl_32x32_self": (2, 20, 1024, 1024, 64),
    "sd15_1024px_self": (2, 8, 16384, 16384, 40),
}


# Attention layers of the public UNet configs (bench/e2e.py CONFIGS): per resolution level, channels and heads;
# which levels hold transformer blocks (self- + cross-attention each), how many blocks per level (down + up),
# and the mid block's level. Context: 77 text tokens.
MODELS = {
    "sd15": dict(channels=(320, 640, 1280, 1280), heads=(8, 8, 8, 8), blocks={0: 5, 1: 5, 2: 5}, mid=3),
    "sd21": dict(channels=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), blocks={0: 5, 1: 5, 2: 5}, mid=3),
    "sdxl": dict(channels=(320, 640, 1280), heads=(5, 10, 20), blocks={1: 2 * 2 + 3 * 2, 2: 2 * 10 + 3 * 10}, mid=2,
                 mid_blocks=10),
}
TEXT_TOKENS = 77


def model_attention_shapes(model: str, px: int, batch: int = 2) -> dict[tuple, int]:
    """``{(batch, heads, q tokens, kv tokens, head dim): number of layers}`` for one UNet call at ``px``²."""
    m = MODELS[model]
    counts = dict(m["blocks"])
    counts[m["mid"]] = counts.get(m["mid"], 0) + m.get("mid_blocks", 1)
    shapes: dict[tuple, int] = {}
    for level, n in sorted(counts.items()):
        heads = m["heads"][level]
        tokens = (px // 8 >> level) ** 2
        for kv in (tokens, TEXT_TOKENS):
            key = (batch, heads, tokens, kv, m["channels"][level] // heads)
            shapes[key] = shapes.get(key, 0) + n
    return shapes


def median_ms(fn, device: torch.device | str, reps: int = 10) -> float:
    """Median milliseconds of ``fn()`` on ``device`` (CUDA events on a GPU), after one warm-up call."""
    device = torch.device(device)
    fn()  # warm-up (compilation, autotuning, allocator)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


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


def graphed(fn, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """Record ``fn`` into a CUDA graph, after warm-up calls on a side stream (compilation, autotuning)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
