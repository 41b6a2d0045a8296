export PYTHONPATH=$PWD MOESERVE_COMMIT=73adc4414ebf14cb610db113dca5182f8f3e5761 MOESERVE_CACHE_DIR=/tmp/mc
W=$OUT/w; mkdir -p $W; nvidia-smi -L > $W/gpus.txt
timeout 300 python3 benchmarks/kernels/bench_kernels.py --only int4 --skip-checks --out $W > $W/int4.log 2>&1; echo int4 rc=$?
grep -E "^int4_linear|^fused_moe int4|FAIL|mismatch" $W/int4.log | tail -20
tar czf $OUT/call3.tgz -C $W .
