"""Instruction budgets of every kernel config attnreuse launches for SD1.5, SD2.1 and SDXL, checked on a CPU:
``bench/sass_report.py`` compiles each for sm_90a (H100/H200) and sm_89 (RTX 4090, L4, L40S) and reads the SASS.

The budgets (no spills; map, V, K and Q loads of 8 bytes or more per thread; ``cached_pv`` issue ≤ 0.8 × memory
time for fp16, fp8 and 4-bit maps; capture ≤ 1.3 × a flash-attention tile plus the map's write) hold for every
config except those in :data:`KNOWN_MISSES`. That list is exact: a config that starts missing a budget fails
this test, and so does one in the list that stops missing it (then take it off).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (arch, kernel, map format, (batch, heads, q tokens, kv tokens, head dim)) -> budgets it misses
KNOWN_MISSES = {
    # Head dim 80 (SD1.5's 32² level, 16.8 M map entries): the per-block factor multiply grows with the head dim
    # (80 FMAs per row and key block) while a 4-bit tile stays 64 bytes a row: issue 1.0-1.2 × memory on the H200.
    ("sm_90a", "cached_pv", "fp4", (2, 8, 1024, 1024, 80)): ["issue"],
    ("sm_90a", "cached_pv", "fp4", (2, 8, 1024, 77, 80)): ["issue"],
    ("sm_90a", "cached_pv", "fp8", (2, 8, 1024, 77, 80)): ["issue"],
    # Cross-attention at ≤ 1024 queries, one key block per row: the 4-bit encode on a masked tile, 1.32 × the reference.
    ("sm_90a", "capture", "fp4", (2, 20, 576, 77, 64)): ["capture"],
    ("sm_90a", "capture", "fp4", (2, 20, 144, 77, 64)): ["capture"],
    ("sm_90a", "capture", "fp4", (2, 20, 1024, 77, 64)): ["capture"],
    # Ragged or one-block rows at ≤ 1024 queries on sm_89: 8-120 bytes of spills at 255 registers.
    ("sm_89", "capture", "fp16", (2, 8, 1024, 77, 80)): ["spills"],
    ("sm_89", "capture", "bf16", (2, 8, 1024, 77, 80)): ["spills"],
    ("sm_89", "capture", "fp8", (2, 8, 1024, 77, 80)): ["spills"],
    ("sm_89", "capture", "fp4", (2, 8, 1024, 77, 80)): ["spills"],
    ("sm_89", "capture", "fp4", (2, 20, 576, 576, 64)): ["spills"],
    ("sm_89", "capture", "fp4", (2, 20, 144, 144, 64)): ["spills"],
    # 4-bit maps on sm_89: mma.sync's operand layout wants 8 consecutive keys per thread, the storage keeps the
    # Hopper fragment order, so the map is copied to shared memory 4 bytes per thread (coalesced over the warp;
    # issue stays ≤ 0.43 × memory).
    ("sm_89", "cached_pv", "fp4", (2, 8, 4096, 4096, 40)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 8, 1024, 1024, 80)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 5, 9216, 9216, 64)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 10, 2304, 2304, 64)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 20, 576, 576, 64)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 20, 144, 144, 64)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 10, 4096, 4096, 64)): ["map loads"],
    ("sm_89", "cached_pv", "fp4", (2, 20, 1024, 1024, 64)): ["map loads"],
}
# The layers that hold most map bytes (SD1.5, SD2.1 and SDXL self-attention at the 64² latent level and above):
# every budget on Hopper, no exception.
LARGEST = {(2, 8, 4096, 4096, 40), (2, 10, 4096, 4096, 64), (2, 5, 9216, 9216, 64)}


def _kinds(failures: list[str]) -> list[str]:
    return sorted({"map loads" if f.startswith("map") else f.split(" ")[0] for f in failures})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("sass") / "sass.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real GPU targets
    subprocess.run([sys.executable, "bench/sass_report.py", "--arch", "sm_90a", "sm_89", "--jobs", "2",
                    "--json", str(out)], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def test_every_shipped_config_keeps_its_budgets_or_is_a_known_miss(report):
    rows = [r for r in report["rows"] if r["kernel"] != "flash"]
    assert {r["arch"] for r in rows} == {"sm_90a", "sm_89"} and len(rows) > 200
    misses = {(r["arch"], r["kernel"], r["format"], tuple(r["shape"])): _kinds(r["failures"])
              for r in rows if r["failures"]}
    assert misses == KNOWN_MISSES
    for r in rows:
        if tuple(r["shape"]) in LARGEST and r["arch"] == "sm_90a":
            assert not r["failures"], r


def test_the_largest_layers_as_numbers(report):
    """SD1.5 64² self-attention (d = 40) on the H200 model: the figures the README quotes."""
    rows = {(r["arch"], r["kernel"], r["format"]): r for r in report["rows"]
            if tuple(r["shape"]) == (2, 8, 4096, 4096, 40)}
    for fmt in ("fp16", "fp8", "fp4"):
        pv = rows[("sm_90a", "cached_pv", fmt)]
        assert pv["model"]["issue_over_memory"] <= 0.8 and pv["spill_bytes"] == 0
        assert min(int(w) for w in pv["loads"]["map"]) >= 8 and min(int(w) for w in pv["loads"]["V"]) == 16
        cap = rows[("sm_90a", "capture", fmt)]
        assert cap["spill_bytes"] == 0 and cap["capture_over_reference"] <= 1.3
        assert min(int(w) for w in cap["stores"]["map"]) >= 8


def test_model_check_relates_gpu_timings_to_the_model(report):
    """bench/model_check.py on a kernel table as a GPU run writes it: one row per kernel and map format timed, the
    prediction from the card's measured bandwidth, measured / predicted."""
    from bench.model_check import compare
    from bench.sass_report import CARDS, predict_ms
    shape = [2, 8, 4096, 4096, 40]
    kernels = {"card": "NVIDIA H100 80GB HBM3", "copy_TBps": 3.0, "sm_count": 132, "sm_clock_ghz": None,
               "shapes": {"sd15_64x64_self": {"shape": shape, "pv16_ms": 0.2, "pv8_ms": 0.1, "pv4_ms": 0.06,
                                              "capture8_ms": 0.3}}}
    rows = compare(kernels, report, "sm_90a")
    assert {(r["kernel"], r["format"]) for r in rows} == {("cached_pv", "fp16"), ("cached_pv", "fp8"),
                                                          ("cached_pv", "fp4"), ("capture", "fp8")}
    pv8 = next(r for r in rows if r["kernel"] == "cached_pv" and r["format"] == "fp8")
    sass = next(r for r in report["rows"] if r["arch"] == "sm_90a" and r["kernel"] == "cached_pv"
                and r["format"] == "fp8" and r["shape"] == shape)
    assert pv8["predicted_ms"] == pytest.approx(predict_ms(sass, CARDS["H100"]))
    assert pv8["ratio"] == pytest.approx(0.1 / pv8["predicted_ms"])
    # an fp8 map of this layer is 277 MB: at 3 TB/s at least 0.09 ms
    assert 0.09 < pv8["predicted_ms"] < 0.2


@pytest.mark.parametrize("shape", [(1, 2, 150, 150, 40), (2, 2, 64, 77, 64)])
def test_the_capture_yardstick_is_attention(shape):
    """bench/flash_reference.py's kernel (Triton's interpreter on a CPU) against float64 attention, its output
    buffer poisoned first: the capture budget compares with a kernel that computes what capture does."""
    import torch

    from attnreuse.kernels import formats
    from attnreuse.kernels.tuning import capture_config
    from bench import flash_reference
    from tests.helpers import out64, probs64, random_qkv, rel_err

    b, h, nq, nk, d = shape
    q, k, v = random_qkv(shape, torch.float16, seed=sum(shape))
    out = torch.full_like(q, float("nan"))
    flash_reference.launch(q, k, v, h, d ** -0.5, capture_config(d, nq, nk, formats.get("fp16")), out=out)
    assert rel_err(out, out64(probs64(q, k, h, d ** -0.5), v, h)) < 2e-3
