export PYTHONPATH=$PWD MOESERVE_COMMIT=63aa10b4f3670fd8426c51979e052aa2eb29148c
mkdir -p $OUT/w; nvidia-smi -L > $OUT/w/gpus.txt
timeout 420 python3 benchmarks/kernels/retune_shipped.py --out $OUT/w > $OUT/w/retune.log 2>&1; echo rc=$?
grep -E "stale|re-tuned|FAILED" $OUT/w/retune.log; grep -c "\[tuned\]" $OUT/w/retune.log
