"""The GPU check's own scripts, run on a CPU so that they do not rot between GPU sessions: the correctness matrix
(kernels in Triton's interpreter, each case in its own process, the first-use check reporting on the side) and the
host-time benchmark."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(*args, timeout=300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, f"{args}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_correctness_matrix_runs_each_case_in_its_own_process(tmp_path):
    cases = ["sd15_64_cross_d40/fp4/fp16", "ragged/fp8/fp16"]
    printed = run("bench/correctness.py", "--smoke", "--jobs", "2", "--out", str(tmp_path), "--only", *cases)
    results = [json.loads(line) for line in (tmp_path / "cases.jsonl").read_text().splitlines()]
    assert sorted(r["case"] for r in results) == sorted(cases) and "| 2 | 2 | 0 | 0 | 0 |" in printed
    for r in results:
        assert r["status"] == "clean" and r["selfcheck_caught"] == []  # the kernels ran raw, and were right
        assert 0 < r["capture_err"] < 2e-2 and 0 < r["cached_pv_err"] < 0.25
        assert r["capture_again_err"] == r["capture_err"] and 0 < r["captured_map_again_err"] < 0.25


@pytest.mark.parametrize("how", [(), ("--direct",), ("--sdpa", "real")])
def test_host_overhead_benchmark_runs(how):
    printed = run("bench/host_overhead.py", "--calls", "20", *how)
    lines = [line for line in printed.splitlines() if "µs per call" in line]
    assert [line.split("  ")[0].strip() for line in lines] == [
        "unpatched (AttnProcessor2_0)", "attnreuse computing call", "attnreuse capturing call",
        "attnreuse reusing call"]
