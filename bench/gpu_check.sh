#!/usr/bin/env bash
# One GPU session, correctness first: the correctness matrix and the GPU tests within 4 minutes on a fresh machine,
# compilation included, the timings after them within 7 in all (each stage's limit). Every stage runs under its own
# timeout and writes to $OUT as it goes; a stage that fails, crashes or times out never stops the next.
#
#   1. correctness matrix (bench/correctness.py): every shipped shape class x map format x fp16/bf16 activations,
#      each case in its own process with CUDA_LAUNCH_BLOCKING=1, for the landed kernels (.baseline/, if
#      `bash bench/baseline.sh REV` made it: carry .baseline along) and this tree's, side by side
#   2. GPU tests: the kernels (raw, against float64), the first-use checks, the patched UNet, torch.compile
#   3. warm-up of a patched SD1.5 512²: compile and check every kernel variant (the check's cost per variant),
#      then the cost tables the default plan uses
#   4. host time per attention call (back-to-back calls of one layer: AttnProcessor2_0 vs capture / reuse)
#   5. kernel tables, this tree's and the landed one's: GPU time against copy bandwidth and SDPA
#   6. UNet calls and 20-step loops, eager and graphed, SD1.5 512² and 1024², SDXL 1024² (bench/e2e.py)
# A short table comes last, then the card's name.
#
# The device machine lacks diffusers: on this side run ../shared/device/wheels.sh once from the project root (it fills
# .whl/), then begin the device command with the line it prints, e.g.
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD || exit 1; bash bench/gpu_check.sh
# (carry .whl, and .baseline if made). Files land in $OUT (./out/gpu without it).
#
#   bash bench/gpu_check.sh          the check
#   bash bench/gpu_check.sh sweep    config variants on three shapes, then ncu on fp8 cached_pv
set -uo pipefail
out=${OUT:-out/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$(mktemp -d)}  # empty: the cold start is measured, not assumed
export ATTNREUSE_CACHE_DIR=${ATTNREUSE_CACHE_DIR:-$(mktemp -d)}  # cost tables measured here, not found
card() { nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader; }
card > "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$out/gpu.txt"
t_start=$SECONDS

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

stage() {  # stage NAME SECONDS COMMAND...: run under a timeout, log to $out/NAME.txt, record the exit and time
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$out/stages.txt"
}

trees=(--tree .)
[ -d .baseline ] && trees=(--tree .baseline --tree .)
stage correctness 140 python bench/correctness.py "${trees[@]}" --jobs 14 --timeout 90 --out "$out"
stage tests 90 python -m pytest -q -x -rf tests/test_kernels.py tests/test_selfcheck.py tests/test_gpu.py \
    tests/test_compile_gpu.py
stage warmup 40 python -m attnreuse warmup --model sd15 --resolution 512 --cache-dtype fp8 fp4 --modes eager graphed
stage host 15 python bench/host_overhead.py --device cuda --calls 500
if [ -d .baseline ]; then
    stage kernels_landed 30 env PYTHONPATH=".baseline:${PYTHONPATH:-}" python .baseline/bench/kernel_table.py \
        --shapes sd15_64x64_self sdxl_64x64_self --no-generation --json "$out/kernels_landed.json"
fi
stage kernels 35 python bench/kernel_table.py --fp4 --no-generation --json "$out/kernels.json"
stage e2e 90 python bench/e2e.py --json "$out/e2e.json" --cases sd15:512 sd15:1024 sdxl:1024 --reps 10

echo
cat "$out/stages.txt"
echo; echo "correctness (each case its own process):"; cat "$out/table.md" 2>/dev/null | head -n 30
echo; grep -E "passed|failed|error" "$out/tests.txt" | tail -n 3
echo; grep -E "ready in|WRONG|cost table" "$out/warmup.txt"
echo; cat "$out/host.txt"
[ -f "$out/kernels_landed.txt" ] && { echo; echo "landed kernels:"; grep -v '^{' "$out/kernels_landed.txt" | tail -n 8; }
echo; grep -v '^{' "$out/kernels.txt" | tail -n 16
echo; tail -n 8 "$out/e2e.txt"
echo "total $((SECONDS - t_start)) s"
cat "$out/gpu.txt"
