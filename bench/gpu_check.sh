#!/usr/bin/env bash
# One GPU session, start to finish: correctness first, then every timing, a short table last.
# On the lent device machine: bash bench/gpu_check.sh  (details land in $OUT, or ./out without it).
# Fits one 10-minute command (150 + 180 + 240 s at most); E2E_CASES="sdxl:1024 sd15:768 sd21:768" for the rest.
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee "$out/gpu.txt"
timeout 150 python -m pytest -q -x tests/test_kernels.py tests/test_gpu.py 2>&1 | tail -n 15 | tee "$out/tests.txt"
timeout 180 python bench/kernel_table.py --json "$out/kernels.json" 2>&1 | tee "$out/kernels.txt" | tail -n 9
timeout 240 python bench/e2e.py --json "$out/e2e.json" --cases ${E2E_CASES:-sd15:512 sd15:1024} \
    2>&1 | tee "$out/e2e.txt" | tail -n 5
