export PYTHONPATH=$PWD MOESERVE_COMMIT=6091431e MOESERVE_CACHE_DIR=/tmp/mc
W=$OUT/w; mkdir -p $W
nvidia-smi -L
timeout 230 python3 benchmarks/kernels/bench_kernels.py --only int4 --skip-checks --out $W > $W/int4.log 2>&1; echo int4 rc=$?
grep -E "int4|us " $W/int4.log | grep -v autotune | tail -30
timeout 250 python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B --layers 4,8 --batches 1,8 --top 40 > $W/profile.log 2>&1; echo prof rc=$?
tail -70 $W/profile.log
cp -r /tmp/mc/autotune $W/ 2>/dev/null
tar czf $OUT/call1.tgz -C $W .
