"""Kernel microbenchmarks (pytest-benchmark): ``pytest bench --benchmark-json=kernels.json``. Need a GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")

from attnreuse.harness import SHAPES

BENCHED = ("sd15_64x64_self", "sd15_64x64_cross", "sdxl_32x32_self")


def timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()
    run()  # compile / autotune outside the measurement
    benchmark.pedantic(run, rounds=50, warmup_rounds=5)


@pytest.fixture(params=BENCHED)
def qkv(request):
    b, h, nq, nk, d = SHAPES[request.param]
    q, k, v = (torch.randn(b, n, h * d, device="cuda", dtype=torch.float16) for n in (nq, nk, nk))
    return q, k, v, h, d ** -0.5


def test_sdpa(benchmark, qkv):
    from attnreuse.kernels.reference import split_heads
    q, k, v, h, _ = qkv
    qh, kh, vh = (split_heads(x, h) for x in (q, k, v))
    timed(benchmark, lambda: F.scaled_dot_product_attention(qh, kh, vh))


@pytest.mark.parametrize("map_dtype", ["fp16", "fp8"])
def test_capture(benchmark, qkv, map_dtype):
    from attnreuse.kernels import FP8
    from attnreuse.kernels.triton_ops import capture_triton
    q, k, v, h, scale = qkv
    dtype = FP8 if map_dtype == "fp8" else torch.float16
    timed(benchmark, lambda: capture_triton(q, k, v, h, scale, dtype))


@pytest.mark.parametrize("map_dtype", ["fp16", "fp8"])
def test_cached_pv(benchmark, qkv, map_dtype):
    from attnreuse.kernels import FP8
    from attnreuse.kernels.triton_ops import cached_pv_triton, capture_triton
    q, k, v, h, scale = qkv
    _, cmap = capture_triton(q, k, v, h, scale, FP8 if map_dtype == "fp8" else torch.float16)
    timed(benchmark, lambda: cached_pv_triton(cmap, v, h))
