"""Timing on a device, for the planner, the command line and the benchmarks: a median timer, CUDA-graph
capture, and a UNet's capturing and reusing steps."""
from __future__ import annotations

import time

import torch


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


def capture_and_reuse(unet: torch.nn.Module, time_fn, cache_dtype: str | None) -> tuple:
    """``time_fn()`` of one call of ``unet`` patched to capture the maps in ``cache_dtype``, then to reuse them,
    and the bytes of the cached maps: ``(capture, reuse, nbytes)``."""
    from .patching import patch  # patching imports this module (through the planner)

    with patch(unet, "10", cache_dtype=cache_dtype) as handle, handle.generation(2) as gen:
        gen.hold(0)  # "10": step 0 captures
        capture = time_fn()
        gen.hold(1)  # every call now reuses the maps of the last capture
        reuse = time_fn()
        return capture, reuse, handle.cache_bytes
