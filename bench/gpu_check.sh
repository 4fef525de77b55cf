#!/usr/bin/env bash
# One GPU session, start to finish, in at most 6 minutes on a fresh machine (compilation included). Every stage
# runs under its own timeout and writes its results to $OUT as it goes: a stage that fails or times out keeps
# what it finished and never stops the stages after it. The tables come last, then the card's name.
#
#   1. cold start: the kernels of a patched SD1.5 512² UNet with fp8 maps, compiled from an empty Triton cache
#   2. GPU tests of the patched UNet: Triton path vs PyTorch path, all-compute bit-identical, torch.compile,
#      CUDA graphs (tests/test_gpu.py, tests/test_compile_gpu.py)
#   3. the landed kernels' table, if a checkout of them is in .baseline/ (bash bench/baseline.sh REV makes it;
#      carry .baseline along), on the same card in the same run
#   4. this tree's kernel table (fp16, fp8, 4-bit maps; SD1.5 512² generation line)
#   5. end to end: SD1.5 512² and SDXL 1024² UNet calls and 20-step loops (ρ = reuse step / full step)
#   6. the per-kernel tests (tests/test_kernels.py on the GPU)
#   meanwhile on the CPU: the SASS report for this GPU's architecture, then the model against the timings
#
# The device machine lacks diffusers and sageattention: on this side run ../shared/device/wheels.sh once from the
# project root (it fills .whl/), then begin the device command with the line it prints, e.g.
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
card() { nvidia-smi --query-gpu=name,clocks.max.sm,clocks.max.mem,power.limit --format=csv,noheader; }
card > "$out/gpu.txt"
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

arch=$(python -c "import torch; print({(9, 0): 'sm_90a', (8, 9): 'sm_89', (8, 0): 'sm_80'}.get(
    torch.cuda.get_device_capability(), 'sm_90a'))")
stage sass 300 env TRITON_CACHE_DIR="$(mktemp -d)" python bench/sass_report.py --arch "$arch" --jobs 8 \
    --json "$out/sass.json" &  # on the CPU, beside the GPU stages
sass_pid=$!

stage cold_start 45 python -m attnreuse warmup --model sd15 --resolution 512 --cache-dtype fp8
stage tests_unet 75 python -m pytest -q -rA tests/test_gpu.py tests/test_compile_gpu.py
if [ -d .baseline ]; then
    stage kernels_landed 50 env PYTHONPATH=".baseline:${PYTHONPATH:-}" python .baseline/bench/kernel_table.py \
        --shapes sd15_64x64_self sdxl_64x64_self --no-generation --json "$out/kernels_landed.json"
fi
stage kernels 75 python bench/kernel_table.py --fp4 --json "$out/kernels.json"
stage e2e 75 python bench/e2e.py --json "$out/e2e.json" --cases sd15:512 sdxl:1024 --reps 10
stage tests_kernels 40 python -m pytest -q -x tests/test_kernels.py
wait "$sass_pid"
[ -f "$out/sass.json" ] && [ -f "$out/kernels.json" ] && \
    python bench/model_check.py "$out/kernels.json" "$out/sass.json" --arch "$arch" --json "$out/model_check.json" \
        > "$out/model_check.txt" 2>&1

echo; cat "$out/stages.txt"
tail -n 2 "$out/cold_start.txt"
grep -E "passed|failed|error" "$out/tests_unet.txt" | tail -n 2
grep -E "passed|failed|error" "$out/tests_kernels.txt" | tail -n 2
[ -f "$out/kernels_landed.txt" ] && { echo; echo "landed kernels:"; grep -v '^{' "$out/kernels_landed.txt" \
    | grep -v '^sd[0-9a-z_]* {' | tail -n 8; }
echo; grep -v '^{' "$out/kernels.txt" | grep -v '^sd[0-9a-z_]* {' | tail -n 22
echo; tail -n 6 "$out/e2e.txt"
echo; tail -n 14 "$out/model_check.txt" 2>/dev/null
echo "total $((SECONDS - t_start)) s"
card
