#!/usr/bin/env bash
# Step traces (benchmarks/kernels/step_trace.py) of several variants of one workload on one multi-GPU machine, each
# in its own process, one after the other: where a parallel layout's step time goes, and which change moves it.
#
#   VARIANTS="name|ENV=1 ENV2=x|--engine-arg k=v ...;name2|...|..." bash benchmarks/run_layout_traces.sh [workload...]
#   e.g. VARIANTS="dp2ep||--engine-arg data_parallel_size=2 --engine-arg enable_expert_parallel=true" \
#        bash benchmarks/run_layout_traces.sh "throughput@60:64"
# SHAPE (qwen3-30b-a3b), NUM_REQUESTS (256), EACH_S (seconds a variant may take, 150). Logs in $OUT/<name>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
O=${OUT:?set OUT}
(($#)) || set -- "throughput@60:64"
wl=()
for w in "$@"; do wl+=(--workload "$w"); done
IFS=';' read -ra items <<< "${VARIANTS:?set VARIANTS}"
for item in "${items[@]}"; do
  IFS='|' read -r name envs args <<< "$item"
  log="$O/$name.log"
  echo "\$ env $envs step_trace.py --shape ${SHAPE:-qwen3-30b-a3b} ${wl[*]} $args" > "$log"
  # shellcheck disable=SC2086  # envs and args are word lists
  env $envs timeout "${EACH_S:-150}" python3 benchmarks/kernels/step_trace.py --shape "${SHAPE:-qwen3-30b-a3b}" \
    --max-model-len 4096 --num-requests "${NUM_REQUESTS:-256}" "${wl[@]}" $args >> "$log" 2>&1
  echo "exit $?" >> "$log"
  echo "=== $name ($envs $args)"
  grep -E "^wall|^  (kind|decode|mixed|prefill) |host, self|profile of|^    _|^    nccl|exit" "$log" | cut -c1-230
done
cp "$MOESERVE_CACHE_DIR"/autotune/*.json "$O/" 2>/dev/null || true
