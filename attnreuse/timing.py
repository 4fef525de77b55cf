"""Leaf timing helpers, for the cost tables, the command line and the benchmarks: a median timer with CUDA
events, a wall-clock timer of back-to-back calls (what an eager caller waits), and CUDA-graph capture.

This module imports nothing from attnreuse: measuring sits below everything that patches (the UNet's step
kinds are timed in :mod:`attnreuse.steps`, above :mod:`attnreuse.patching`).
"""
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


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (CUDA, MPS, ...); a CPU runs synchronously."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "synchronize"):
            backend.synchronize()


def wall_ms(fn, device: torch.device | str, calls: int = 10, reps: int = 5) -> float:
    """Milliseconds per call of ``fn()`` as an eager caller sees them: the median over ``reps`` rounds of
    (wall time of ``calls`` back-to-back calls, device synchronised before and after) / ``calls``, after one
    warm-up call.

    Back-to-back calls measure a call's share of a stream of calls: its GPU time while the host keeps ahead
    of the GPU, its host time (Python, dispatch, kernel launches) once the host falls behind, as in an eager
    UNet that is host-bound (SD1.5 512² on a fast GPU). CUDA events around one lone call would show the GPU
    time alone, and hide exactly the launch overhead that decides whether reuse pays eagerly.
    """
    fn()  # warm-up (compilation, autotuning, allocator)
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3 / calls)
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
