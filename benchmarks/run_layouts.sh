#!/usr/bin/env bash
# Several parallel layouts of one shape on one multi-GPU machine, each through the suite, results in
# $OUT/<layout>/, then one table of all of them. ENGINES=moeserve,vllm runs vLLM beside moeserve in each layout's
# suite with the same layout arguments (vLLM's LLM(...) takes the same names: tensor_parallel_size,
# enable_expert_parallel, pipeline_parallel_size; its offline API refuses data_parallel_size: serve_pair.py).
#
#   bash benchmarks/run_layouts.sh SHAPE "name:engine_args;..." [bench_suite flags...]
#   e.g. bash benchmarks/run_layouts.sh qwen3-30b-a3b "tp1:;tp2:tensor_parallel_size=2" --num-requests 400
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
OUT_DIR="${OUT:-benchmarks/results}"
SHAPE="$1"; LAYOUTS="$2"; shift 2
ENGINES="${ENGINES:-moeserve}"
IFS=';' read -ra items <<< "$LAYOUTS"
for item in "${items[@]}"; do
  [[ -z "$item" ]] && continue
  name="${item%%:*}"; args="${item#*:}"
  flags=()
  IFS=',' read -ra kvs <<< "$args"
  for kv in "${kvs[@]}"; do [[ -n "$kv" ]] && flags+=(--engine-arg "$kv" --vllm-engine-arg "$kv"); done
  mkdir -p "$OUT_DIR/$name"
  echo "=== layout $name: ${flags[*]:-(one GPU)}"
  python3 benchmarks/bench_suite.py --shape "$SHAPE" --engines "$ENGINES" --out-dir "$OUT_DIR/$name" "${flags[@]}" "$@" \
    > "$OUT_DIR/$name/suite.log" 2>&1 || echo "layout $name: suite exit $?"
  grep -E "phase (moeserve|vllm)|error|Error" "$OUT_DIR/$name/suite.log" | tail -4
done
python3 benchmarks/layout_table.py "$OUT_DIR"
