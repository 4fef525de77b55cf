#!/usr/bin/env bash
# One GPU session, start to finish, in at most 6 minutes on a fresh machine (compilation included):
# the cold start (kernels of a patched SD1.5 512² UNet with fp8 maps compiled from an empty Triton cache), GPU
# tests, the kernel table (all shapes + the SD1.5 512² whole-generation line), the SD1.5 512² and SDXL 1024²
# end-to-end rows; the kernel and e2e tables last, then the card's name.
#
# The device machine lacks diffusers and sageattention: on this side run ../shared/device/wheels.sh once from
# the project root (it fills .whl/), then begin the device command with the line it prints, e.g.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD || exit 1; bash bench/gpu_check.sh
# (carry .whl along). Files land in $OUT (./out without it).
#
#   bash bench/gpu_check.sh          the check (cold start 40 s + tests 90 s + kernels 130 s + e2e 100 s at most)
#   bash bench/gpu_check.sh sweep    config variants on the three shapes, then ncu on fp8 cached_pv
set -uo pipefail
out=${OUT:-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d)}  # empty: the cold start is measured, not assumed
card() { nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader; }
card > "$out/gpu.txt"

if [ "${1:-check}" = sweep ]; then
    timeout 300 python bench/kernel_table.py --sweep --shapes sd15_64x64_self sdxl_64x64_self sd15_1024px_self \
        --json "$out/sweep.json" 2>&1 | tee "$out/sweep.txt"
    if command -v ncu > /dev/null; then
        timeout 150 ncu --kernel-name regex:cached_pv --launch-skip 1 --launch-count 1 --set full \
            -o "$out/pv8" -f python bench/kernel_table.py --single pv8 --shapes sd15_64x64_self > "$out/ncu.txt" 2>&1
        ncu --import "$out/pv8.ncu-rep" --page details --section SpeedOfLight --section MemoryWorkloadAnalysis \
            --section WarpStateStats 2>&1 | tail -n 60
    fi
    card
    exit 0
fi

t0=$SECONDS
timeout 40 python -m attnreuse warmup --model sd15 --resolution 512 --cache-dtype fp8 > "$out/cold_start.txt" 2>&1
echo "cold start: exit $? in $((SECONDS - t0)) s" >> "$out/cold_start.txt"
t1=$SECONDS
timeout 90 python -m pytest -q -x tests/test_kernels.py tests/test_gpu.py > "$out/tests.txt" 2>&1
echo "tests: exit $? in $((SECONDS - t1)) s" | tee -a "$out/tests.txt"
t2=$SECONDS
timeout 130 python bench/kernel_table.py --json "$out/kernels.json" > "$out/kernels.txt" 2>&1
echo "kernel table: exit $? in $((SECONDS - t2)) s" >> "$out/kernels.txt"
t3=$SECONDS
timeout 100 python bench/e2e.py --json "$out/e2e.json" --cases sd15:512 sdxl:1024 > "$out/e2e.txt" 2>&1
echo "e2e: exit $? in $((SECONDS - t3)) s" >> "$out/e2e.txt"

tail -n 2 "$out/cold_start.txt"
tail -n 3 "$out/tests.txt"
echo; grep -v '^{' "$out/kernels.txt" | grep -v '^sd[0-9a-z_]* {' | tail -n 22
echo; tail -n 14 "$out/e2e.txt"
echo "total $((SECONDS - t0)) s"
card
