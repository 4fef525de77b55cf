"""Every kernel launch that real SD1.5 512², SD2.1 768² and SDXL 1024² UNets make, compiled for sm_90a, sm_89 and
sm_80 under the oldest and the newest supported Triton, each with its own ptxas (bench/launches.py).

A compile error fails, and so does a compiled kernel that reads a register before anything wrote it
(bench/sass_dataflow.py): on an H200, Triton 3.6's ptxas built kernels that did (a one-stage split head dim read
its wgmma descriptors from unset registers; the 4-bit capture read e5m2 conversions hoisted above their inputs),
which gave wrong cross-attention and NaN 4-bit maps while every interpreter test passed.

The work runs in the background from collection on (tests/compile_matrix.py); the oldest Triton is installed once
per machine into a folder of its own, or taken from ``$ATTNREUSE_OLDEST_TRITON``; the newest is the one installed
here.
"""
from __future__ import annotations

import pytest

from tests import compile_matrix
from tests.compile_matrix import OLDEST_TRITON


@pytest.fixture(scope="module")
def compiled():
    """``(launches, {Triton version: compiled rows})``: started in the background at collection (conftest.py)."""
    return compile_matrix.start().wait()


def test_both_ends_of_the_supported_range_compile_the_recorded_launches(compiled):
    launches, results = compiled
    assert OLDEST_TRITON in results and len(results) == 2, "the newest Triton here is the oldest supported one"
    for version, result in results.items():
        assert result["triton"] == version
        assert len(result["rows"]) == len(launches)


def test_the_launches_are_those_real_unets_make(compiled):
    """Recorded from patched UNets, so they hold what broke on the GPU: SD1.5's 77-key cross-attention at head
    dims 40 and 80, every map format, both kernels, for each target."""
    launches, _ = compiled
    seen = {(launch["arch"], launch["kernel"], launch["kwargs"]["HEAD_DIM"], launch["kwargs"]["EVEN_N"])
            for launch in launches}
    for arch in (90, 89, 80):
        for kernel in ("capture_kernel", "cached_pv_kernel"):
            for d in (40, 64, 80):
                assert (arch, kernel, d, False) in seen and (arch, kernel, d, True) in seen
    made_by = " | ".join(m for launch in launches for m in launch["made_by"])
    for model in ("sd15@512", "sd21@768", "sdxl@1024"):
        for fmt in ("fp16", "bf16", "fp8", "fp4"):
            for batch in ("b1", "b2"):
                assert f"{model} {batch} float16 {fmt} capture" in made_by
                assert f"{model} {batch} float16 {fmt} reuse" in made_by


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_every_launch_compiles(compiled, end):
    _, results = compiled
    version = OLDEST_TRITON if end == "oldest" else max(results, key=lambda v: tuple(map(int, v.split(".")[:2])))
    errors = [f"{r['arch']} {r['kernel']} {r['meta']}: {r['error']}" for r in results[version]["rows"] if "error" in r]
    assert not errors, f"Triton {version}: {len(errors)} launches do not compile, e.g.\n" + "\n".join(errors[:5])


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_no_kernel_reads_a_register_before_anything_wrote_it(compiled, end):
    _, results = compiled
    version = OLDEST_TRITON if end == "oldest" else max(results, key=lambda v: tuple(map(int, v.split(".")[:2])))
    bad = [f"{r['arch']} {r['kernel']} d={r['meta']['HEAD_DIM']} stages={r['meta']['num_stages']} "
           f"[{r['made_by'][0]}]: {r['uninitialised_reads'][:2]}"
           for r in results[version]["rows"] if r.get("uninitialised_reads")]
    assert not bad, f"Triton {version}: {len(bad)} kernels read unwritten registers, e.g.\n" + "\n".join(bad[:5])


SHARED_PER_BLOCK = {"sm_90a": 232448, "sm_89": 101376, "sm_80": 166912}  # bytes a block may use
# the layers that hold most map bytes: SD1.5 64² (d = 40), SDXL 64² and SD2.1 96² (d = 64) self-attention
LARGEST = {("sd15@512", "40"), ("sdxl@1024", "64"), ("sd21@768", "64")}


@pytest.mark.parametrize("end", ["oldest", "newest"])
def test_what_the_machine_code_shows_without_a_gpu(compiled, end):
    """Shared memory within each target's limit per block (beyond it a launch fails), no spills on Hopper (sm_89:
    at most 64 bytes, in captures of rows that end in a partial key block), and the largest layers read and write
    their map, V, K and Q as 16-byte vectors."""
    _, results = compiled
    version = OLDEST_TRITON if end == "oldest" else max(results, key=lambda v: tuple(map(int, v.split(".")[:2])))
    rows = results[version]["rows"]
    for r in rows:
        assert r["shared_bytes"] <= SHARED_PER_BLOCK[r["arch"]], r
        assert r["spill_bytes"] <= {"sm_90a": 0, "sm_89": 64, "sm_80": 128}[r["arch"]], (r["arch"], r["meta"])
    largest = [r for r in rows if r["arch"] == "sm_90a" and r["meta"]["EVEN_N"] == "True" and r["meta"]["EVEN_M"] == "True"
               and any((m.split()[0], r["meta"]["HEAD_DIM"]) in LARGEST and " b2 " in m for m in r["made_by"])]
    assert {r["kernel"] for r in largest} == {"capture_kernel", "cached_pv_kernel"} and len(largest) >= 12
    for r in largest:
        capture = r["kernel"] == "capture_kernel"
        assert all(set(r["loads"][op]) == {"16"} for op in ["V"] + (["Q", "K"] if capture else ["map"])), r["loads"]
        assert not capture or set(r["stores"]["map"]) == {"16"}, r["stores"]
