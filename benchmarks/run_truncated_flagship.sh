#!/usr/bin/env bash
# Issue 20 before an 8-GPU machine is lent: DeepSeek-R1's per-layer shapes (fp8 block-scaled as published, dummy
# weights) with fewer layers (--hf-overrides), on the GPUs present, through the commands of the full-size run:
#   1. `moeserve plan` for this fleet (TP=N+EP, and DP=N attention + EP), text and JSON;
#   2. the fail-fast check: the engine (LLM(...), as `moeserve serve` builds it) of the full 61-layer model with TP=N+EP must refuse before a weight
#      loads, exit non-zero, and say why (time to refusal recorded);
#   3. the suite per layout (latency at batch 1/32/128, throughput), with the seeds' flags (max_model_len 16384,
#      max_num_batched_tokens 4096, gpu_memory_utilization 0.88); vLLM beside moeserve where its offline API runs
#      the layout (TP+EP; vLLM refuses LLM(data_parallel_size>1) in one process, so DP runs moeserve alone).
#
#   LAYERS=12 LAYOUTS="tp4ep dp4ep" ENGINES_tp4ep=moeserve,vllm BUDGET=520 bash benchmarks/run_truncated_flagship.sh
#   SHAPE=kimi-k2.5 bash benchmarks/run_truncated_flagship.sh     # Kimi K2.5's int4 experts (issue 20 item 2)
#   SHAPE=qwen3-235b-a22b LAYOUTS="tp4 tp4ep" ENGINES_tp4=moeserve,vllm bash benchmarks/run_truncated_flagship.sh
#     # issue 15's Qwen3-235B-A22B on 4xH200, whole (94 layers, bf16): it fits, so no fail-fast step; the plan's
#     # KV capacity per layout is in plan-<layout>.json beside the suite's memory_report
#   SHAPE=qwen3-235b-a22b LAYERS=12 LAYOUTS="tp4 tp4nccl" ENGINES_tp4=moeserve,vllm WORKLOADS=latency bash ...
#     # a layout name ending in "nccl" adds disable_custom_all_reduce=true for moeserve (its all-reduce through
#     # symmetric memory is on by default at 4+ ranks, vLLM's custom one too), "symm" enable_custom_all_reduce=true
#   LAYERS=5 RANDOM_WEIGHTS=/tmp/rw/r1-5 bash benchmarks/run_truncated_flagship.sh   # one random block-fp8
#     checkpoint for both engines (benchmarks/random_checkpoint.py): on dummy weights R1's correction bias sends
#     every token to the same 8 experts, so batches > 1 read 8 experts per layer. The checkpoint is built in bf16 on
#     one GPU before it is quantized: 3 dense + 2 MoE layers (~50 GB bf16) fit; 12 layers (~200 GB) do not.
# Results under $OUT/flagship (or benchmarks/results/flagship): plan*.log/json, failfast.log, <layout>/...
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
OUT_DIR="${OUT:-benchmarks/results}/flagship/${SHAPE:-deepseek-r1}"
mkdir -p "$OUT_DIR"
N=$(nvidia-smi -L | wc -l)
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
case "$GPU" in *H200*) FLEET="${N}xH200-141GB" ;; *) FLEET="${N}xH100-80GB" ;; esac
SHAPE="${SHAPE:-deepseek-r1}"
FAILFAST=1  # the whole model must be refused before a weight loads (it does not fit these GPUs)
case "$SHAPE" in
  deepseek-r1) LAYERS="${LAYERS:-12}"; MODEL=deepseek-ai/DeepSeek-R1; OV="{\"num_hidden_layers\":$LAYERS}" ;;
  kimi-k2.5) LAYERS="${LAYERS:-12}"; MODEL=moonshotai/Kimi-K2.5
    OV="{\"text_config\":{\"num_hidden_layers\":$LAYERS}}" ;;  # a multimodal config
  qwen3-235b-a22b) LAYERS="${LAYERS:-94}"; MODEL=Qwen/Qwen3-235B-A22B; OV="{\"num_hidden_layers\":$LAYERS}"
    FAILFAST=0 ;;  # fits 4xH200 whole
  *) echo "SHAPE: deepseek-r1, kimi-k2.5 or qwen3-235b-a22b"; exit 2 ;;
esac
LAYOUTS="${LAYOUTS:-tp${N}ep dp${N}ep}"
BUDGET="${BUDGET:-520}"
echo "=== $N x $GPU as $FLEET; $MODEL with $LAYERS layers; layouts: $LAYOUTS"

plan() {  # name, extra plan flags
  python3 -m moeserve.cli plan "$MODEL" --gpus "$FLEET" --hf-overrides "$OV" --max-model-len 16384 \
    --gpu-memory-utilization 0.88 --max-num-batched-tokens 4096 "${@:2}" > "$OUT_DIR/plan-$1.log" 2>&1
  python3 -m moeserve.cli plan "$MODEL" --gpus "$FLEET" --hf-overrides "$OV" --max-model-len 16384 \
    --gpu-memory-utilization 0.88 --max-num-batched-tokens 4096 "${@:2}" --json > "$OUT_DIR/plan-$1.json" 2>&1
  sed -n '/^layout/,/^verdict/p;/^launch (moeserve)/,+1p' "$OUT_DIR/plan-$1.log"
}
echo "=== 1. plan"
for name in $LAYOUTS; do
  case "$name" in
    tp*ep) plan "$name" --tp "${name//[!0-9]/}" ;;
    dp*ep) plan "$name" --attention-dp ;;
    tp*) plan "$name" --tp "${name//[!0-9]/}" ;;  # the plan places experts by EP; per GPU the same bytes as TP-sharded
  esac
done

if [[ $FAILFAST == 1 ]]; then
echo "=== 2. fail-fast: the full model on $N GPUs, TP=$N+EP"
t0=$(date +%s.%N)
timeout 300 python3 -c "
import sys
from moeserve import LLM
LLM(model='$MODEL', load_format='dummy', tensor_parallel_size=$N, enable_expert_parallel=True, max_model_len=16384,
    gpu_memory_utilization=0.88)
sys.exit('it loaded: the fit check did not refuse')" > "$OUT_DIR/failfast.log" 2>&1
rc=$?
t1=$(date +%s.%N)
echo "exit $rc after $(python3 -c "print(f'{$t1 - $t0:.1f}')") s" | tee -a "$OUT_DIR/failfast.log"
grep -iE "does not fit|DoesNotFit|Suggestion" "$OUT_DIR/failfast.log" | head -3
fi

echo "=== 3. the suite per layout"
for name in $LAYOUTS; do
  case "$name" in
    tp*ep|tp*ep_symm|tp*ep_nccl) lay=(tensor_parallel_size="${name//[!0-9]/}" enable_expert_parallel=true) ;;
    dp*ep|dp*ep_symm|dp*ep_nccl) lay=(data_parallel_size="${name//[!0-9]/}" enable_expert_parallel=true) ;;
    tp*) lay=(tensor_parallel_size="${name//[!0-9]/}") ;;
    *) echo "unknown layout $name"; continue ;;
  esac
  own=()  # moeserve only
  [[ "$name" == *symm ]] && own=(--engine-arg enable_custom_all_reduce=true)
  [[ "$name" == *nccl ]] && own=(--engine-arg disable_custom_all_reduce=true)
  var="ENGINES_$name"
  engines="${!var:-moeserve}"
  flags=()
  for kv in "${lay[@]}" "hf_overrides=$OV" max_model_len=16384 max_num_batched_tokens=4096; do
    flags+=(--engine-arg "$kv")
    [[ "$engines" == *vllm* ]] && flags+=(--vllm-engine-arg "$kv")
  done
  mkdir -p "$OUT_DIR/$name"
  echo "--- $name ($engines): ${lay[*]}"
  [ -n "${RANDOM_WEIGHTS:-}" ] && flags+=(--random-weights "$RANDOM_WEIGHTS")
  python3 benchmarks/bench_suite.py --shape "$SHAPE" --engines "$engines" --workloads "${WORKLOADS:-latency,throughput}" \
    --latency-batches "${LATENCY_BATCHES:-1,32,128}" --num-requests "${NUM_REQUESTS:-512}" --gpu-memory-utilization 0.88 \
    --budget-s "$BUDGET" --hf-reserve-s 0 --out-dir "$OUT_DIR/$name" "${flags[@]}" "${own[@]}" > "$OUT_DIR/$name/suite.log" 2>&1 \
    || echo "$name: suite exit $?"
  grep -E "=== phase|GPU KV cache size|kv_capacity|error|Error" "$OUT_DIR/$name/suite.log" | tail -12
  sed -n '/^##/,$p' "$OUT_DIR/$name"/*latency.log 2>/dev/null | tail -30
done
# a call returns only a few files: one archive of everything
[[ -n "${OUT:-}" ]] && tar czf "$OUT/flagship.tar.gz" -C "$OUT_DIR" . && echo "wrote $OUT/flagship.tar.gz"
# and what the kernels' autotuner chose for these shapes, so the next start (and moeserve/kernels/tuned/) has it
[[ -n "${OUT:-}" ]] && tar czf "$OUT/autotune.tar.gz" -C "$MOESERVE_CACHE_DIR" autotune
