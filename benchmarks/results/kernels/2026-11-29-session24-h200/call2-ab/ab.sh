# A/B on one H200: this tree (router GEMV+top-k in one launch at 1 token; the MoE's sum inside the down kernel)
# against .base (6091431). Full-depth qwen3-30b-a3b, dummy weights, CUDA graphs: TPOT and the graph step's kernels.
W=$OUT/w; mkdir -p $W; nvidia-smi -L > $W/gpus.txt
run() {  # tree name shape batches
  (cd $1 && PYTHONPATH=$PWD MOESERVE_COMMIT=$2 MOESERVE_CACHE_DIR=/tmp/mc-${1//[.\/]/x} timeout 170 python3 \
    benchmarks/kernels/profile_decode.py --shape $3 --layers 48 --batches $4 --output 128 --no-eager --top 30) \
    > $W/$2-$(basename $3).log 2>&1
  echo "$2 $3 rc=$?"; grep -E "TPOT ms|start-up" $W/$2-$(basename $3).log
}
run . e62d078 Qwen/Qwen3-30B-A3B 1,8,32
run .base 6091431 Qwen/Qwen3-30B-A3B 1,8,32
run . e62d078 Qwen/Qwen3-30B-A3B-FP8 1,8
run .base 6091431 Qwen/Qwen3-30B-A3B-FP8 1,8
run . e62d078-again Qwen/Qwen3-30B-A3B 1,8,32
tar czf $OUT/call2.tgz -C $W .
