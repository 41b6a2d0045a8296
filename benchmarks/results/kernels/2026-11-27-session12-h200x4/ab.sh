set -u
export PYTHONUNBUFFERED=1
for t in base new; do mkdir -p /tmp/cache-$t/autotune && cp -n benchmarks/results/autotune/*.json /tmp/cache-$t/autotune/; done
nvidia-smi -L > $OUT/gpus.txt
for shape in "qwen3-235b-a22b:4" "mixtral-8x7b:2"; do
  s=${shape%%:*}; n=${shape##*:}
  for t in base new; do
    if [ $t = base ]; then P=$PWD/.base:$PWD; else P=$PWD; fi
    PYTHONPATH=$P MOESERVE_CACHE_DIR=/tmp/cache-$t timeout 125 python3 benchmarks/kernels/profile_decode.py --shape $s --layers 12 --batches 32,128 --steps 5 --top 12 --no-eager --llm-args "{\"tensor_parallel_size\": $n}" > $OUT/$s-tp$n-$t.log 2>&1
    echo "$s tp$n $t rc=$? $(grep -E 'TPOT ms' $OUT/$s-tp$n-$t.log)"
  done
done
