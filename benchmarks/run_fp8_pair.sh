#!/usr/bin/env bash
# Issue 19.8 on one warm machine: bash benchmarks/run_fp8_pair.sh STEP... (results under $OUT, packed: a call
# returns few files). Steps run in the order given:
#   ckpt     benchmarks/random_checkpoint.py's block-fp8 qwen3-30b-a3b (written tensor by tensor, ~31 GB) into $RW
#   random   moeserve fp8 on that checkpoint (latency b1..128 + throughput)
#   ratio    moeserve bf16 and fp8 on dummy weights, latency, on the same GPU (the fp8 / bf16 ratio)
#   base     the same from .base, an older tree carried beside this one, with an autotune cache of its own: the A/B.
#            mkdir .base && git archive REV moeserve benchmarks/peers benchmarks/kernels \
#              $(git ls-tree --name-only REV benchmarks/ | grep '\.py$') | tar -x -C .base
#   vllm     vLLM 0.26.0 fp8 on the same checkpoint (installed first: carry the four parts, device_receive.sh);
#            VLLM_USE_DEEP_GEMM=0 unless given (DeepGEMM's warm-up took ~7 min in session 14)
#   kernels  bench_kernels --only fp8_linear fp8_moe
#   profile  the fp8 decode profile at batch 1
#   pdl      programmatic dependent launch, A/B in one call: bf16 latency with MOESERVE_PDL=0, then on (the default)
#   pdlfp8   the same for fp8
#   pdlwait  fp8 with MOESERVE_PDL=2 (wait, no early release); results under STEP-MODE
#   pdlprefill / pdlprefillfp8  where PDL loses on large launches (benchmarks/kernels/pdl_prefill_ab.py): PDL off,
#            as landed, and on every launch (wait only; wait and release), 4 layers: TTFT 1k-16k, TPOT, the kernels
#   tokenops the prefill kernels' two forms (bench_kernels --only token_ops), then `ab` on the throughput workload
#   ab       this tree, then .base (BASE_COMMIT names it), each a suite of WORKLOADS, on the checkpoint if `ckpt` wrote
#            one (else dummy weights): an engine A/B (session 21's MoE tile candidate: carry .base = git archive
#            3fe9ee7, run `ckpt ab`)
#   trace    benchmarks/kernels/step_trace.py on the checkpoint: the throughput workload's steps by kind, then kernel
#            profiles of TRACE_WINDOWS (default: a full prefill step and decode steps at 256 rows)
#   pdltests the PDL test, the split-K reduce tests and the CUDA model tests (graphs against eager, against the CPU);
#            not the CPU-only PDL script test, which spent the whole 240 s of session 21's call 3 on the device
#   telemetry  expert-load telemetry's cost in a decode step (issue 18: < 1 % at batch 1 and 128), bf16 qwen3-30b
#   tests    the fp8 / int4 kernel test files with tracebacks (on the last GPU)
#   routing  benchmarks/routing_check.py on the checkpoint: moeserve's, vLLM's and transformers' greedy tokens and
#            routed experts per decode step (batch 32), then the comparison (vLLM installed first, as for `vllm`);
#            ROUTING_ENGINES="vllm" (say) runs fewer; VLLM_USE_DEEP_GEMM=0 as for `vllm` (session 20: DeepGEMM's
#            797-shape warm-up ran vLLM's routing run out of its 200 s)
# RUN_S=570 (say) shortens a suite that would run past the call's limit.
# Every call also returns the autotune cache (autotune-*.json): merge it into moeserve/kernels/tuned/, or a fresh card
# tunes every fp8 key at start-up again (160 s on an H200 in session 15, which ran a 200 s suite out of time).
# vLLM comes in four parts, one per call (64 MiB carry limit with the ~20 MiB tree: fetch.py --part-mib 42), while
# the machine stays warm (~30 s after a call; a cold machine loses the parts, the checkpoint and the Triton cache):
#   carry .vllm_whl/p1 (+ .base): bash benchmarks/peers/vllm/device_receive.sh p1; bash benchmarks/run_fp8_pair.sh ckpt ...
#   p2, p3: the same with other steps;  p4: ... routing vllm
# A fresh machine compiles every Triton kernel first (~85 s of a suite's start-up): give a first suite >= 180 s, an fp8
# one >= 200 s (session 18: three fp8 first suites ran out at 140-170 s). Each PDL mode compiles its own kernels.
# The machine is given back ~30 s after a call: send the four vLLM parts first, in four short calls back to back
# (session 18 lost machine A between a 284 s call and the next, and with it p1 and the checkpoint).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MOESERVE_CACHE_DIR="${MOESERVE_CACHE_DIR:-/tmp/moeserve-cache}"
O=${OUT:?set OUT}
RW=${RW:-/root/rw/qwen3-30b-a3b-fp8}
WORKLOADS=${WORKLOADS:-latency,throughput}  # of `random` and `vllm`; bench_suite also has varlen, prefix, longctx
(($#)) || { echo "usage: run_fp8_pair.sh ckpt|random|ratio|base|vllm|kernels|profile|telemetry|tests|routing..." >&2; exit 2; }
nvidia-smi -L | tee "$O/gpus.txt"
gpus=$(nvidia-smi -L | wc -l)
suite() {  # seconds, engine, shape, out name, more bench_suite args
  local t=$1 engine=$2 shape=$3 name=$4 left=$((${RUN_S:-99999} - SECONDS - 30)); shift 4
  ((t > left)) && t=$left  # RUN_S: what the whole invocation may take (the call's limit); packing needs ~30 s
  ((t < 60)) && { echo "$name skipped: ${t} s left"; return; }
  CUDA_VISIBLE_DEVICES=0 timeout "$t" python3 benchmarks/bench_suite.py --shape "$shape" --engines "$engine" \
    --latency-repeats 3 --num-requests 512 --budget-s $((t - 15)) --out-dir "$O/$name" "$@" > "$O/$name.log" 2>&1
  echo "$name rc=$?"; grep -E "^\| 20|kv_capacity|phase (moeserve|vllm|total)" "$O/$name.log" | tail -12
}
run_step() {
case $1 in
ckpt)
  CUDA_VISIBLE_DEVICES=0 timeout 500 python3 benchmarks/random_checkpoint.py --shape qwen3-30b-a3b-fp8 --out "$RW" \
    > "$O/random-checkpoint.log" 2>&1
  echo "random checkpoint rc=$?"; tail -2 "$O/random-checkpoint.log"; du -sh "$RW" ;;
random) suite "${SUITE_S:-330}" moeserve qwen3-30b-a3b-fp8 moeserve-fp8-random --workloads "$WORKLOADS" \
  --random-weights "$RW" ;;
ratio)
  suite 180 moeserve qwen3-30b-a3b bf16-dummy --workloads latency
  suite 150 moeserve qwen3-30b-a3b-fp8 fp8-dummy --workloads latency ;;
base)  # a cold Triton cache for the old kernels' sources: give it the time (session 16's baseline ran out in start-up)
  [[ -d .base/moeserve ]] || { echo "base: no .base tree (carry it)"; return 2; }
  mkdir -p /tmp/cache-base/autotune && cp -n moeserve/kernels/tuned/*.json /tmp/cache-base/autotune/
  (cd .base && export PYTHONPATH=$PWD MOESERVE_CACHE_DIR=/tmp/cache-base
   suite 180 moeserve qwen3-30b-a3b base-bf16-dummy --workloads latency
   suite 180 moeserve qwen3-30b-a3b-fp8 base-fp8-dummy --workloads latency) ;;
vllm)
  [[ -d ${VLLM_SITE:-/tmp/vllm_site}/vllm ]] || bash benchmarks/peers/vllm/device_install.sh > "$O/vllm_import_audit.log" 2>&1
  tail -2 "$O/vllm_import_audit.log" 2>/dev/null
  VLLM_USE_DEEP_GEMM=${VLLM_USE_DEEP_GEMM:-0} suite "${SUITE_S:-480}" vllm qwen3-30b-a3b-fp8 vllm-fp8-random \
    --workloads "$WORKLOADS" --random-weights "$RW" ;;
kernels)
  CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/kernels/bench_kernels.py --skip-checks \
    --only fp8_linear fp8_moe --out "$O/kernels" > "$O/kernels.log" 2>&1
  echo "bench_kernels rc=$?"; grep -E "^fp8|SUMMARY|FAIL" "$O/kernels.log" | tail -30 ;;
profile)
  CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B-FP8 \
    --layers 8 --batches 1 --steps 5 --top 24 --no-eager > "$O/profile-fp8-b1.log" 2>&1
  echo "profile rc=$?"; grep -A26 "batch 1:" "$O/profile-fp8-b1.log" | head -28 ;;
pdl|pdlfp8|pdlwait)  # one suite per PDL mode (pdlwait: 2, each kernel waits and none releases the next early)
  shape=qwen3-30b-a3b; [[ $1 == pdl ]] || shape=qwen3-30b-a3b-fp8
  modes="0 1"; [[ $1 == pdlwait ]] && modes=2
  for mode in $modes; do
    (export MOESERVE_PDL=$mode; suite "${PDL_S:-200}" moeserve $shape $1-$mode --workloads latency)
  done ;;
pdlprefill|pdlprefillfp8)  # a fresh machine compiles each PDL mode's kernels (three modes): give it >= 450 s
  shape=Qwen/Qwen3-30B-A3B; [[ $1 == pdlprefill ]] || shape=Qwen/Qwen3-30B-A3B-FP8
  CUDA_VISIBLE_DEVICES=0 timeout "${PDL_S:-480}" python3 benchmarks/kernels/pdl_prefill_ab.py --shape $shape \
    --out "$O/$1.json" > "$O/$1.log" 2>&1
  echo "$1 rc=$?"; grep "^== " "$O/$1.log"; sed -n '/^TTFT ms/,$p' "$O/$1.log" | head -48 ;;
tokenops)  # prefill's per-token kernels, both forms (bench_kernels token_ops), then fp8 throughput here and in .base
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/kernels/bench_kernels.py --skip-checks --only token_ops \
    --out "$O/token-ops" > "$O/token-ops.log" 2>&1
  echo "token_ops rc=$?"; grep -E "^(act quant|rope)|checks" "$O/token-ops.log" | tail -16
  WORKLOADS=throughput run_step ab ;;
ab)  # on the checkpoint where one was written (`ckpt` first), else on dummy weights
  weights=(); [[ -d $RW ]] && weights=(--random-weights "$RW")
  suite "${SUITE_S:-200}" moeserve qwen3-30b-a3b-fp8 ab-new --workloads "$WORKLOADS" "${weights[@]}"
  [[ -d .base/moeserve ]] || { echo "ab: no .base tree (carry it)"; return 2; }
  mkdir -p /tmp/cache-base/autotune && cp -n moeserve/kernels/tuned/*.json /tmp/cache-base/autotune/
  (cd .base && export PYTHONPATH=$PWD MOESERVE_COMMIT=${BASE_COMMIT:-unknown} MOESERVE_CACHE_DIR=/tmp/cache-base
   suite "${SUITE_S:-200}" moeserve qwen3-30b-a3b-fp8 ab-base --workloads "$WORKLOADS" "${weights[@]}") ;;
trace)
  args=(); for w in ${TRACE_WINDOWS:-throughput@8:10 throughput@120:124}; do args+=(--workload "$w"); done
  CUDA_VISIBLE_DEVICES=0 timeout "${TRACE_S:-300}" python3 benchmarks/kernels/step_trace.py --shape qwen3-30b-a3b-fp8 \
    --model "$RW" --engine-arg load_format=auto "${args[@]}" --top 28 > "$O/step-trace.log" 2>&1
  echo "trace rc=$?"; grep -E "^(==|--)|wall |profile of" "$O/step-trace.log" | head -20 ;;
pdltests)
  CUDA_VISIBLE_DEVICES=0 timeout "${TESTS_S:-240}" python3 -m pytest -v --tb=short -p no:cacheprovider tests/test_pdl.py \
    tests/test_split_k_reduce.py tests/test_models_cuda.py -k "not on_the_cpu" > "$O/pdl-tests.log" 2>&1
  echo "pdltests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$O/pdl-tests.log" | tail -15 ;;
telemetry)
  CUDA_VISIBLE_DEVICES=0 timeout 240 python3 benchmarks/kernels/telemetry_overhead.py --shape Qwen/Qwen3-30B-A3B \
    --layers 8 --batches 1,128 > "$O/telemetry.log" 2>&1
  echo "telemetry rc=$?"; tail -6 "$O/telemetry.log" ;;
tests)
  CUDA_VISIBLE_DEVICES=$((gpus - 1)) timeout "${TESTS_S:-400}" python3 -m pytest -v --tb=short -p no:cacheprovider \
    tests/test_fp8_moe_kernel.py tests/test_int4_moe_kernel.py tests/test_int4_kernel.py tests/test_fp8_kernels.py \
    > "$O/cuda-tests.log" 2>&1
  echo "tests rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed" "$O/cuda-tests.log" | tail -15 ;;
routing)
  [[ -d ${VLLM_SITE:-/tmp/vllm_site}/vllm ]] || bash benchmarks/peers/vllm/device_install.sh > "$O/vllm_import_audit.log" 2>&1
  for engine in ${ROUTING_ENGINES:-moeserve vllm transformers}; do  # transformers: its fp8 kernels, else dequantized
    CUDA_VISIBLE_DEVICES=0 VLLM_USE_DEEP_GEMM=${VLLM_USE_DEEP_GEMM:-0} timeout 200 python3 benchmarks/routing_check.py \
      run --engine $engine --model "$RW" --out "$O/routing-$engine.json" > "$O/routing-$engine.log" 2>&1 \
      || { [[ $engine == transformers ]] && CUDA_VISIBLE_DEVICES=0 timeout 200 python3 \
        benchmarks/routing_check.py run --engine transformers --model "$RW" --out "$O/routing-$engine.json" \
        --engine-args '{"dequantize_fp8": true}' > "$O/routing-$engine-dequantized.log" 2>&1; }
    echo "routing $engine rc=$?"
  done
  python3 benchmarks/routing_check.py compare $(ls "$O"/routing-{moeserve,vllm,transformers}.json 2>/dev/null) 2>&1 \
    | tee "$O/routing.txt" ;;
*) echo "unknown step $1" >&2; return 2 ;;
esac
}
for step in "$@"; do echo "== $step $(date +%T)"; run_step "$step"; done
step=$(IFS=-; echo "$*")
cp "$MOESERVE_CACHE_DIR"/autotune/*.json "$O/" 2>/dev/null
(cd "$O" && find . -mindepth 1 -maxdepth 1 ! -name '*.tgz' ! -name '*.json' ! -name gpus.txt -print0 \
  | xargs -0 tar czf "$step.tgz" && find . -mindepth 1 -maxdepth 1 ! -name '*.tgz' ! -name '*.json' \
  ! -name '*.log' ! -name gpus.txt -exec rm -rf {} +)  # top-level logs also come back as they are
ls "$O"
