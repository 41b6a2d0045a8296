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
suite() {  # shape, out subdir, more args
  local shape=$1 sub=$2; shift 2
  timeout 260 python3 benchmarks/bench_suite.py --shape "$shape" --engines moeserve --workloads latency,throughput \
    --latency-repeats 3 --num-requests 512 --budget-s 240 --out-dir "$O/$sub" "$@" > "$O/$sub.log" 2>&1
  echo "$sub rc=$?"; grep -E "TPOT|tok/s|kv|KV|phase total" "$O/$sub.log" | tail -12
}
case "$1" in
A)
  suite qwen3-30b-a3b-fp8 fp8
  suite qwen3-30b-a3b bf16
  echo "=== fp8 decode + mixed steps profile (8 layers)"
  timeout 150 python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B-FP8 --layers 8 --batches 1,128 \
    --mixed 104 --steps 5 --top 14 --no-eager > "$O/profile-fp8.log" 2>&1
  echo "profile rc=$?"; grep -v -i warn "$O/profile-fp8.log" | tail -60 ;;
esac
