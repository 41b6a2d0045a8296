#!/usr/bin/env bash
# The one device command: roofline + moeserve + transformers on the throughput and latency workloads of one
# shape, inside ~9 minutes, results and raw logs into $OUT (the lead copies them into benchmarks/results/).
#
#   MOESERVE_COMMIT=<git hash> bash benchmarks/run_device.sh [--shape qwen3-30b-a3b] [bench_suite.py flags...]
#
# Both workloads share one process per engine (one model load each). Flags worth knowing:
#   --num-requests N (default 1000)  --latency-repeats R (default 5, as many as time allows)
#   --budget-s S (default 530)  --hf-reserve-s S (default 170)  --engines moeserve,transformers
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
SHAPE=qwen3-30b-a3b
if [[ "${1:-}" == "--shape" ]]; then SHAPE="$2"; shift 2; fi
echo "run_device: shape $SHAPE, results in $OUT_DIR, commit ${MOESERVE_COMMIT:-unset}"
nvidia-smi --query-gpu=name,memory.used,memory.total,temperature.gpu,clocks.sm --format=csv || true
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA"; print("torch", torch.__version__, torch.cuda.get_device_name())'
# Kernel block sizes: the package's shipped choices for this GPU (moeserve/kernels/tuned/) and the shapes they lack
# tuned into an empty cache, which goes back into $OUT: merge it into the shipped file.
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
start=$(date +%s)
status=0
python3 benchmarks/bench_suite.py --shape "$SHAPE" --workloads throughput,latency --out-dir "$OUT_DIR" "$@" || status=$?
cp "$MOESERVE_CACHE_DIR"/autotune/*.json "$OUT_DIR/" 2>/dev/null || true
echo "run_device: done in $(( $(date +%s) - start )) s, exit $status"
ls -la "$OUT_DIR"
exit $status
