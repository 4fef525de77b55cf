"""Kernel microbenchmarks (pytest-benchmark): ``pytest bench --benchmark-json=kernels.json``. Need a GPU;
the whole-generation arithmetic of the kernel table is checked on any machine."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnreuse.architectures import attention_shapes
from bench.measure import SHAPES

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="kernel benchmarks need a CUDA GPU")
BENCHED = ("sd15_64x64_self", "sd15_64x64_cross", "sdxl_32x32_self")
MAP_FORMATS = ("fp16", "fp8", "fp4")


def timed(benchmark, fn):
    def run():
        fn()
        torch.cuda.synchronize()
    run()  # compile outside the measurement
    benchmark.pedantic(run, rounds=50, warmup_rounds=5)


@pytest.fixture(params=BENCHED)
def qkv(request):
    b, h, nq, nk, d = SHAPES[request.param]
    q, k, v = (torch.randn(b, n, h * d, device="cuda", dtype=torch.float16) for n in (nq, nk, nk))
    return q, k, v, h, d ** -0.5


@gpu
def test_sdpa(benchmark, qkv):
    from attnreuse.kernels.reference import split_heads
    q, k, v, h, _ = qkv
    qh, kh, vh = (split_heads(x, h) for x in (q, k, v))
    timed(benchmark, lambda: F.scaled_dot_product_attention(qh, kh, vh))


@gpu
@pytest.mark.parametrize("map_format", MAP_FORMATS)
def test_capture(benchmark, qkv, map_format):
    from attnreuse.kernels import capture
    q, k, v, h, scale = qkv
    timed(benchmark, lambda: capture(q, k, v, h, scale, map_format, backend="triton"))


@gpu
@pytest.mark.parametrize("map_format", MAP_FORMATS)
def test_cached_pv(benchmark, qkv, map_format):
    from attnreuse.kernels import cached_pv, capture
    q, k, v, h, scale = qkv
    _, cmap = capture(q, k, v, h, scale, map_format, backend="triton")
    timed(benchmark, lambda: cached_pv(cmap, v, h, backend="triton"))


def test_generation_line_counts_steps_by_schedule():
    """HURRY-10: 9 plain, 1 capture, 10 reuse steps; PHAST-10 (11111111010001000000): 7, 3, 10."""
    from bench.kernel_table import generation
    row = {"sdpa_ms": 1.0, "sage_ms": 0.5, "sage_note": "", "capture16_ms": 3.0, "pv16_ms": 0.9,
           "capture8_ms": 3.0, "pv8_ms": 0.4}
    layers = sum(attention_shapes("sd15", 512).values())
    g = generation(1e12, {s: row for s in attention_shapes("sd15", 512)})
    assert layers == 32 and g["sdpa_ms"] == 20 * layers and g["sage_ms"] == 10 * layers
    assert g["HURRY-10_fp8_ms"] == pytest.approx(layers * (9 + 3 + 10 * 0.4))
    assert g["PHAST-10_fp16_ms"] == pytest.approx(layers * (7 + 3 * 3 + 10 * 0.9))


SMOKE = """
import torch
import attnreuse.kernels.api as api
from bench import kernel_table as kt
api._use_triton = lambda *args: True  # the Triton path on CPU tensors
kt.DEVICE, kt.bench_ms = "cpu", lambda fn: (fn(), 1.0)[1]
kt.MAP_FORMATS["4"] = "fp4"
shape = (1, 2, 20, 150, 40)
r = kt.measure(shape, 1e12)
assert r["pv8_err"] < 3e-2 and r["pv4_err"] < 0.25 and r["capture16_err"] < 2e-3, r
rows = kt.sweep("tiny", shape, 1e12)
assert not [k for k, v in rows.items() if "error" in v], rows
for kernel in ("pv8", "pv4", "capture8", "capture4"):
    kt.single(kernel, shape, "rule", 1)
kt.print_table({"card": "cpu", "copy_TBps": 1.0, "shapes": {"tiny": r}})
"""


def test_table_runs_in_the_interpreter():
    """The table, the sweep and the single-kernel mode on a tiny shape, in Triton's interpreter on the CPU."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", SMOKE], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
