#!/usr/bin/env bash
# On a 2-GPU machine, one run: the symmetric-memory all-reduce's CUDA test and its latency against NCCL per
# size; the MLA prefill kernel's CUDA tests and timing on GPU 1 while TP=1 decode TPOT of SHAPE runs on GPU 0;
# then TP=2 with the one-shot all-reduce (tp2_symm) and TP=2 with NCCL (tp2, the default). CHECK=1 adds the layouts' tokens against one
# GPU (benchmarks/multi_gpu_check.py). Results under $OUT (default benchmarks/results/layouts/allreduce).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O="${OUT:-benchmarks/results/layouts}/allreduce"
mkdir -p "$O/layouts"
S="${SHAPE:-qwen3-30b-a3b}"
LAT=(--workloads latency --latency-repeats "${REPEATS:-1}" --hf-reserve-s 0 --engines moeserve)
echo "=== symmetric all-reduce: CUDA test"
timeout 150 python3 -m pytest -q -x tests/test_symmetric_all_reduce.py > "$O/test.log" 2>&1; tail -2 "$O/test.log"
echo "=== latency per size"
timeout 120 python3 benchmarks/all_reduce_bench.py --world 2 --hidden 2048 --out "$O/all_reduce_2048.json" > "$O/all_reduce_2048.log" 2>&1
grep -v -i "warn" "$O/all_reduce_2048.log" | tail -14
echo "=== GPU 1: MLA prefill tests and timing | GPU 0: TP=1 decode"
( export CUDA_VISIBLE_DEVICES=1
  [[ "${MLA_TESTS:-1}" == 1 ]] && timeout 240 python3 -m pytest -q tests/test_mla_prefill.py tests/test_kernels_mla.py > "$O/mla_tests.log" 2>&1
  timeout 150 python3 benchmarks/kernels/bench_kernels.py --skip-checks --only mla_prefill --out "$O/mla_prefill" > "$O/mla_prefill.log" 2>&1 ) &
mkdir -p "$O/layouts/tp1"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_suite.py --shape "$S" --out-dir "$O/layouts/tp1" --budget-s 180 "${LAT[@]}" > "$O/layouts/tp1/suite.log" 2>&1
wait
tail -2 "$O/mla_tests.log"; grep -v -i "warn\|autotune" "$O/mla_prefill.log" | tail -12
echo "=== TP=2, one-shot vs NCCL"
OUT="$O/layouts" bash benchmarks/run_layouts.sh "$S" \
  "tp2_symm:tensor_parallel_size=2,enable_custom_all_reduce=true;tp2:tensor_parallel_size=2;${EXTRA_LAYOUTS:-}" \
  --budget-s 170 "${LAT[@]}" 2>&1 | tail -12
grep -h "symmetric memory" "$O"/layouts/*/suite.log | head -2
if [[ "${CHECK:-0}" == 1 ]]; then
  timeout 240 python3 benchmarks/multi_gpu_check.py --archs "${CHECK_ARCHS:-DeepseekV2ForCausalLM}" > "$O/multi_gpu_check.log" 2>&1
  grep -E "tokens|start" "$O/multi_gpu_check.log"
fi
