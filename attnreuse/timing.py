"""Timing on a device, for the planner, the command line and the benchmarks: a median timer and CUDA-graph
capture."""
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
