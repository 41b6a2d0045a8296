#!/usr/bin/env bash
# One device call that checks before it times: the image's packages, kernel tests, the CUDA model tests,
# then a quick end-to-end smoke of a shape. Logs land in $OUT.
cd "$(dirname "$0")/.."
# OMP_NUM_THREADS: each xdist worker computes a CPU fp32 reference; 8 workers x all cores each starved them all.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip list --format=freeze > "$OUT/pip_freeze.txt" 2>/dev/null
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
# A step's limit in seconds; 0 skips it (e.g. KERNEL_S=0 in one process and MODELS_S=0 in another, side by side).
step() { local t=$1; shift; [ "$t" = 0 ] && { echo "== skipped: $*"; return; }; echo "== $* (limit ${t}s)"; local s=$(date +%s); timeout "$t" "$@"; echo "== rc=$? in $(( $(date +%s) - s ))s"; }
step ${KERNEL_S:-150} python3 -m pytest -v -rf --tb=short -n ${KERNEL_WORKERS:-4} -p no:cacheprovider ${KERNEL_TESTS:-tests/test_kernels_attention.py tests/test_kernels_moe.py tests/test_kernels_autotune.py tests/test_kernels_mla.py tests/test_kernels_fused.py tests/test_kernels_linear.py} > "$OUT/kernel_tests.log" 2>&1; grep -E "FAILED|ERROR|passed|failed" "$OUT/kernel_tests.log" | tail -20
step ${MODELS_S:-200} python3 -m pytest -v -rf --tb=short --timeout ${TEST_TIMEOUT_S:-150} -n ${MODEL_WORKERS:-8} -p no:cacheprovider tests/test_models_cuda.py > "$OUT/cuda_models.log" 2>&1; grep -E "FAILED|ERROR|passed|failed|^E " "$OUT/cuda_models.log" | tail -40
step ${SMOKE_S:-150} python3 benchmarks/smoke.py ${SMOKE_ARGS:-} 2>&1 | tee "$OUT/smoke.log" | grep -v Warning | tail -12
