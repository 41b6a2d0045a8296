#!/usr/bin/env bash
# Session 14's device calls: bash calls.sh A|... (results in $OUT).
#   A (one H100, moeserve alone): qwen3-30b-a3b with Qwen's fp8 block-scaled config beside bf16, latency b1..128 and
#     the throughput workload; the fp8 model's decode and mixed steps profiled kernel by kernel.
set -u
cd "$(dirname "$0")/../../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MOESERVE_CACHE_DIR=/tmp/moeserve-cache
O=${OUT:?}
mkdir -p "$MOESERVE_CACHE_DIR/autotune" && cp -n benchmarks/results/autotune/*.json "$MOESERVE_CACHE_DIR/autotune/"
nvidia-smi -L > "$O/gpus.txt"; head -1 "$O/gpus.txt"
git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
suite() {  # shape, out subdir, more args (ENGINE: moeserve or vllm)
  local shape=$1 sub=$2; shift 2
  CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/bench_suite.py --shape "$shape" --engines "${ENGINE:-moeserve}" \
    --workloads latency,throughput --latency-repeats 3 --num-requests 512 --budget-s 310 --out-dir "$O/$sub" "$@" \
    > "$O/$sub.log" 2>&1
  echo "$sub rc=$?"; grep -E "^\| 20|phase total|kv_capacity|num_gpu_blocks" "$O/$sub.log" | tail -14
}
pack() { tar czf "$O/$1.tgz" -C "$O" "${@:2}" && rm -rf "${@/#/$O/}"; }  # the call hands back few files
case "$1" in
A)
  suite qwen3-30b-a3b-fp8 fp8
  suite qwen3-30b-a3b bf16
  echo "=== fp8 decode + mixed steps profile (8 layers)"
  timeout 150 python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B-FP8 --layers 8 --batches 1,128 \
    --mixed 104 --steps 5 --top 14 --no-eager > "$O/profile-fp8.log" 2>&1
  echo "profile rc=$?"; grep -v -i warn "$O/profile-fp8.log" | tail -60 ;;
B)
  bash benchmarks/peers/vllm/device_receive.sh p1
  echo "=== CUDA tests: fp8 experts on fused_moe (W8A16 every kind of scale block, W8A8), fused act-quant GEMM"
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 -m pytest -q -x tests/test_fp8_moe_kernel.py tests/test_fp8_kernels.py \
    tests/test_fp8_cuda.py > "$O/cuda-tests.log" 2>&1 &
  tests=$!
  suite qwen3-30b-a3b-fp8 fp8
  wait $tests; echo "tests rc=$?"; tail -3 "$O/cuda-tests.log"
  pack callB fp8 ;;
C)
  bash benchmarks/peers/vllm/device_receive.sh p2
  suite qwen3-30b-a3b bf16
  echo "=== fp8 weights + fp8 KV cache: capacity"
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/bench_suite.py --shape qwen3-30b-a3b-fp8 --engines moeserve \
    --workloads latency --latency-batches 1,128 --latency-repeats 1 --budget-s 140 --out-dir "$O/fp8kv" \
    --engine-arg kv_cache_dtype=fp8 > "$O/fp8kv.log" 2>&1; echo "fp8kv rc=$?"
  grep -E "^\| 20|kv_capacity|num_gpu_blocks|KV" "$O/fp8kv.log" | tail -6
  pack callC bf16 fp8kv ;;
D2)
  bash benchmarks/peers/vllm/device_receive.sh p3
  for s in Qwen/Qwen3-30B-A3B-FP8 Qwen/Qwen3-30B-A3B; do n=$(basename $s)
    CUDA_VISIBLE_DEVICES=0 timeout 100 python3 benchmarks/kernels/profile_decode.py --shape $s --layers 8 --batches 1 \
      --steps 5 --top 24 --no-eager > "$O/profile-$n.log" 2>&1; echo "$n rc=$?"
  done ;;
E2)
  VLLM_USE_DEEP_GEMM=0 ENGINE=vllm suite qwen3-30b-a3b-fp8 vllm-fp8-nodg
  pack callE2 vllm-fp8-nodg ;;
D)
  bash benchmarks/peers/vllm/device_receive.sh p3
  echo "=== mixtral-8x7b TP=2, moeserve"
  ENGINES=moeserve OUT="$O/mixtral-tp2" timeout 200 bash benchmarks/run_layouts.sh mixtral-8x7b \
    "tp2:tensor_parallel_size=2" --workloads latency --latency-repeats 3 --budget-s 180 2>&1 | tail -8
  pack callD mixtral-tp2 ;;
E)
  bash benchmarks/peers/vllm/device_receive.sh p4 && bash benchmarks/peers/vllm/device_install.sh > "$O/vllm_import_audit.log" 2>&1
  tail -2 "$O/vllm_import_audit.log"
  ENGINE=vllm suite qwen3-30b-a3b-fp8 vllm-fp8
  pack callE vllm-fp8 ;;
F)
  echo "=== mixtral-8x7b TP=2, vLLM"
  ENGINES=vllm OUT="$O/mixtral-tp2-vllm" timeout 300 bash benchmarks/run_layouts.sh mixtral-8x7b \
    "tp2:tensor_parallel_size=2" --workloads latency --latency-repeats 3 --budget-s 280 2>&1 | tail -8
  pack callF mixtral-tp2-vllm ;;
esac
