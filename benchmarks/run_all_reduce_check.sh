#!/usr/bin/env bash
# On a 2-GPU machine: the symmetric-memory all-reduce's CUDA test, its latency against NCCL per size, the
# layouts' tokens against one GPU (fp32 and bf16), and qwen3-30b-a3b decode TPOT of TP=1, TP=2 with the
# one-shot all-reduce and TP=2 with NCCL only, in one run. Results under $OUT (or benchmarks/results/layouts/).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
O="${OUT:-benchmarks/results/layouts}/allreduce"
mkdir -p "$O"
nvidia-smi topo -m > "$O/topo.txt" 2>&1
echo "=== CUDA test"; timeout 300 python3 -m pytest -q -x tests/test_symmetric_all_reduce.py 2>&1 | tail -5 | tee "$O/test.log"
echo "=== latency per size"
timeout 200 python3 benchmarks/all_reduce_bench.py --world 2 --hidden 2048 --out "$O/all_reduce_2048.json" 2>&1 | tee "$O/all_reduce_2048.log"
echo "=== layouts' tokens against one GPU"
timeout "${CHECK_S:-240}" python3 benchmarks/multi_gpu_check.py --archs "${CHECK_ARCHS:-LlamaForCausalLM,Qwen3MoeForCausalLM,DeepseekV2ForCausalLM}" \
  2>&1 | tee "$O/multi_gpu_check_fp32.log" | grep -v "^\s*$" | tail -20
echo "=== decode TPOT"
OUT="$O" bash benchmarks/run_layouts.sh "${SHAPE:-qwen3-30b-a3b}" \
  "tp1:;tp2:tensor_parallel_size=2;tp2_nccl:tensor_parallel_size=2,disable_custom_all_reduce=true;${EXTRA_LAYOUTS:-}" \
  --workloads latency --latency-repeats "${REPEATS:-2}" --budget-s 170 --hf-reserve-s 0 2>&1 | tail -30
