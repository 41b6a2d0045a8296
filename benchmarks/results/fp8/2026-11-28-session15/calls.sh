#!/usr/bin/env bash
# Session 15's device calls, one nvidia-h100-x2 machine held warm: bash calls.sh A|B|C|D|E (results in $OUT).
#   A: GPU 1 compiles and checks every fp8 / int4 kernel form (CUDA tests); GPU 0 writes one random block-fp8
#      checkpoint of qwen3-30b-a3b (transformers' init scale) that both engines load later.
#   B: GPU 0 moeserve fp8 on that checkpoint (latency b1..128 + throughput); GPU 1 bf16 and fp8 on dummy weights,
#      latency only, back to back (the fp8 / bf16 ratio of one GPU).
#   C: GPU 0 bench_kernels fp8_linear + fp8_moe (TFLOP/s beside the fp8 matmul ceiling); GPU 1 the fp8 b1 profile.
#   D: vLLM 0.26.0 installed; vLLM fp8 on the same random checkpoint, GPU 0.
#   E: mixtral-8x7b TP=2 beside vLLM (both GPUs).
set -u
cd "$(dirname "$0")/../../../.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD MOESERVE_CACHE_DIR=/tmp/moeserve-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
O=${OUT:?}
RW=/root/rw/qwen3-30b-a3b-fp8
mkdir -p "$MOESERVE_CACHE_DIR/autotune" && cp -n benchmarks/results/autotune/*.json "$MOESERVE_CACHE_DIR/autotune/"
nvidia-smi -L > "$O/gpus.txt"; head -2 "$O/gpus.txt"
git rev-parse --short HEAD 2>/dev/null; git status --short 2>/dev/null | head -5
suite() {  # gpu, shape, out subdir, more args (ENGINE: moeserve or vllm)
  local gpu=$1 shape=$2 sub=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "${T:-330}" python3 benchmarks/bench_suite.py --shape "$shape" \
    --engines "${ENGINE:-moeserve}" --workloads "${W:-latency,throughput}" --latency-repeats 3 --num-requests 512 \
    --budget-s "$(( ${T:-330} - 20 ))" --out-dir "$O/$sub" "$@" > "$O/$sub.log" 2>&1
  echo "$sub rc=$?"; grep -E "^\| 20|phase total|kv_capacity|num_gpu_blocks" "$O/$sub.log" | tail -14
}
pack() { tar czf "$O/$1.tgz" -C "$O" "${@:2}" && rm -rf "${@/#/$O/}"; }  # the call hands back few files
case "$1" in
A)
  bash benchmarks/peers/vllm/device_receive.sh p1
  df -h / /root /tmp 2>/dev/null | tail -n +2
  echo "=== CUDA tests on GPU 1 (two processes: the expert kernels; the dense/int4/KV ones)"
  CUDA_VISIBLE_DEVICES=1 timeout 520 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_moe_kernel.py \
    > "$O/cuda-tests-moe.log" 2>&1 &
  t1=$!
  CUDA_VISIBLE_DEVICES=1 timeout 520 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kernels.py \
    tests/test_int4_moe_kernel.py tests/test_int4_kernel.py tests/test_fp8_cuda.py tests/test_fp8_kv.py \
    > "$O/cuda-tests-rest.log" 2>&1 &
  t2=$!
  echo "=== random block-fp8 checkpoint on GPU 0"
  CUDA_VISIBLE_DEVICES=0 timeout 500 python3 benchmarks/random_checkpoint.py --shape qwen3-30b-a3b-fp8 --out $RW \
    > "$O/random-checkpoint.log" 2>&1
  echo "random checkpoint rc=$?"; tail -2 "$O/random-checkpoint.log"; du -sh $RW; cat $RW/random_checkpoint.json
  wait $t1; echo "moe tests rc=$?"; tail -3 "$O/cuda-tests-moe.log"
  wait $t2; echo "rest tests rc=$?"; tail -3 "$O/cuda-tests-rest.log"
  grep -E "^(FAILED|ERROR)" "$O"/cuda-tests-*.log | head -20 ;;
B)
  bash benchmarks/peers/vllm/device_receive.sh p2
  (T=200 W=latency suite 1 qwen3-30b-a3b bf16-dummy; T=200 W=latency suite 1 qwen3-30b-a3b-fp8 fp8-dummy) \
    > "$O/gpu1.txt" 2>&1 &
  g1=$!
  T=420 suite 0 qwen3-30b-a3b-fp8 fp8-random --random-weights $RW
  wait $g1; cat "$O/gpu1.txt"
  pack callB fp8-random bf16-dummy fp8-dummy ;;
C)
  bash benchmarks/peers/vllm/device_receive.sh p3
  (CUDA_VISIBLE_DEVICES=1 timeout 200 python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B-FP8 \
     --layers 8 --batches 1 --steps 5 --top 24 --no-eager > "$O/profile-fp8-b1.log" 2>&1; echo "profile rc=$?") &
  g1=$!
  CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/kernels/bench_kernels.py --skip-checks \
    --only fp8_linear fp8_moe --out "$O/kernels" > "$O/kernels.log" 2>&1
  echo "bench_kernels rc=$?"; grep -E "^fp8|SUMMARY|FAIL|ceiling" "$O/kernels.log" | tail -40
  wait $g1; grep -v -i warn "$O/profile-fp8-b1.log" | grep -A28 "batch 1:" | head -30
  pack callC kernels ;;
D)
  bash benchmarks/peers/vllm/device_receive.sh p4 && bash benchmarks/peers/vllm/device_install.sh \
    > "$O/vllm_import_audit.log" 2>&1
  tail -2 "$O/vllm_import_audit.log"
  VLLM_USE_DEEP_GEMM=0 ENGINE=vllm T=480 suite 0 qwen3-30b-a3b-fp8 vllm-fp8-random --random-weights $RW
  pack callD vllm-fp8-random ;;
E)
  echo "=== mixtral-8x7b TP=2, moeserve then vLLM, latency (one repeat)"
  ENGINES=moeserve,vllm OUT="$O/mixtral-tp2" timeout 570 bash benchmarks/run_layouts.sh mixtral-8x7b \
    "tp2:tensor_parallel_size=2" --workloads latency --latency-repeats 1 --budget-s 550 2>&1 | tail -12
  pack callE mixtral-tp2 ;;
esac
