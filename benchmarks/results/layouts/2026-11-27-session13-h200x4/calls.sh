#!/usr/bin/env bash
# Session 13's device calls on one 4-GPU machine, held warm between them: bash calls.sh A|B|C|D (results in $OUT).
#   A: vLLM part 1; the symmetric all-reduce's CUDA test; NCCL / one-shot / two-shot latency per size on 4 and 2
#      GPUs; qwen3-235b TP=4 (12 layers) decode profiled with NCCL and with the symmetric all-reduce.
#   B: vLLM part 2; Qwen3-235B whole (94 layers) at TP=4+EP and TP=4: KV capacity against the plan after one
#      process group per set of ranks (4fe93f6).
#   C: vLLM parts 3-4 and install; qwen3-235b TP=4 (12 layers) latency b1/32/128, moeserve (NCCL, symmetric) and
#      vLLM, same flags.
#   D: DeepSeek-V2 (MLA) tokens on the 4-GPU layouts against one GPU; mixtral-8x7b TP=2 latency beside vLLM.
# As run, before the symmetric all-reduce became the default at 4+ ranks (abecf39): since then multi_gpu_check's
# `tp4` takes that path and `tp4_nccl` is NCCL's; the `tp4_symm` named in D is no longer a layout of it.
set -u
cd "$(dirname "$0")/../../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MOESERVE_CACHE_DIR=/tmp/moeserve-cache
O=${OUT:?}
mkdir -p "$MOESERVE_CACHE_DIR/autotune" && cp -n benchmarks/results/autotune/*.json "$MOESERVE_CACHE_DIR/autotune/"
nvidia-smi -L > "$O/gpus.txt"; head -1 "$O/gpus.txt"
git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
case "$1" in
A)
  bash benchmarks/peers/vllm/device_receive.sh p1
  echo "=== symmetric all-reduce: CUDA test (GPUs 0-1)"
  timeout 150 python3 -m pytest -q -x tests/test_symmetric_all_reduce.py > "$O/test.log" 2>&1; tail -2 "$O/test.log"
  echo "=== latency per size: 4 GPUs, hidden 4096 (qwen3-235b); 2 GPUs, hidden 4096 (mixtral)"
  timeout 150 python3 benchmarks/all_reduce_bench.py --world 4 --hidden 4096 --out "$O/all_reduce_w4_h4096.json" \
    > "$O/all_reduce_w4_h4096.log" 2>&1; grep -v -i warn "$O/all_reduce_w4_h4096.log" | tail -13
  timeout 120 python3 benchmarks/all_reduce_bench.py --world 2 --hidden 4096 --rows 1,8,32,128,256,512,1024 \
    --out "$O/all_reduce_w2_h4096.json" > "$O/all_reduce_w2_h4096.log" 2>&1; grep -v -i warn "$O/all_reduce_w2_h4096.log" | tail -9
  echo "=== qwen3-235b TP=4, 12 layers: decode profile, NCCL vs symmetric"
  for v in nccl symm; do
    args='{"tensor_parallel_size": 4}'
    [[ $v == symm ]] && args='{"tensor_parallel_size": 4, "enable_custom_all_reduce": true}'
    timeout 170 python3 benchmarks/kernels/profile_decode.py --shape qwen3-235b-a22b --layers 12 --batches 1,32,128 \
      --steps 5 --top 14 --no-eager --llm-args "$args" > "$O/profile-tp4-$v.log" 2>&1
    echo "$v rc=$? $(grep -E 'TPOT ms' "$O/profile-tp4-$v.log" | tr '\n' ' ')"
    grep -E "all_reduce|AllReduce|batch [0-9]+: wall" "$O/profile-tp4-$v.log" | head -12
  done ;;
B)
  bash benchmarks/peers/vllm/device_receive.sh p2
  echo "=== Qwen3-235B whole: KV capacity (plan-*.json beside each suite's memory_report)"
  SHAPE=qwen3-235b-a22b LAYOUTS="tp4ep tp4" WORKLOADS=latency LATENCY_BATCHES=1 BUDGET=300 \
    bash benchmarks/run_truncated_flagship.sh > "$O/kv.log" 2>&1
  grep -E "kv_capacity|KV|===|exit" "$O/kv.log" | head -20 ;;
C)
  bash benchmarks/peers/vllm/device_receive.sh p3
  bash benchmarks/peers/vllm/device_receive.sh p4 && bash benchmarks/peers/vllm/device_install.sh > "$O/vllm-install.log" 2>&1
  tail -2 "$O/vllm-install.log"
  SHAPE=qwen3-235b-a22b LAYERS=12 LAYOUTS="tp4symm tp4" ENGINES_tp4=moeserve,vllm WORKLOADS=latency BUDGET=400 \
    bash benchmarks/run_truncated_flagship.sh 2>&1 | tail -40 ;;
D)
  echo "=== DeepSeek-V2 on 4 GPUs against one"
  timeout 280 python3 benchmarks/multi_gpu_check.py --archs DeepseekV2ForCausalLM \
    --layouts tp4_ep,dp4_ep,tp2_pp2,dp2_tp2_ep,tp4_symm --budget-s 230 > "$O/multi_gpu_check-deepseek4.log" 2>&1
  grep -E "start|tokens" "$O/multi_gpu_check-deepseek4.log"
  echo "=== mixtral-8x7b TP=2 (GPUs 0-1) beside vLLM, then with the symmetric all-reduce"
  CUDA_VISIBLE_DEVICES=0,1 ENGINES=moeserve,vllm OUT="$O/mixtral-tp2" timeout 300 bash benchmarks/run_layouts.sh \
    mixtral-8x7b "tp2:tensor_parallel_size=2" --workloads latency --latency-repeats 1 2>&1 | tail -12 ;;
esac
