#!/usr/bin/env bash
# Issue 16.2 on the device: where the traffic workloads' time goes, per shape (benchmarks/kernels/step_trace.py).
# Logs and the autotune cache land in $OUT_DIR (default $OUT). Each shape gets its own time limit.
set -u
OUT_DIR="${OUT_DIR:-${OUT:-/tmp/out}}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
COMMIT=${MOESERVE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr 'A-Z' 'a-z')
trace() {  # shape seconds workload...
  local shape=$1 secs=$2; shift 2
  local args=() w
  for w in "$@"; do args+=(--workload "$w"); done
  local log="$OUT_DIR/$(date -u +%F)-$GPU-$shape-step-trace${TAG:+-$TAG}-$COMMIT.log"
  { echo "\$ step_trace.py --shape $shape ${args[*]} ${EXTRA:-}"; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
    timeout "$secs" python3 benchmarks/kernels/step_trace.py --shape "$shape" --max-model-len 34000 "${args[@]}" ${EXTRA:-}
    echo "exit $?"; } 2>&1 | tee "$log" | grep -v "^USDT"
}
trace qwen3-30b-a3b "${QWEN_S:-250}" ${QWEN_WL:-varlen@300:306 prefix@120:126}
[ -n "${SKIP_DEEPSEEK:-}" ] || trace deepseek-v2-lite "${DEEPSEEK_S:-300}" ${DEEPSEEK_WL:-"longctx:8192:16@40:46" varlen@300:306 prefix@120:126}
cp "$MOESERVE_CACHE_DIR"/autotune/*.json "$OUT_DIR/" 2>/dev/null || true
