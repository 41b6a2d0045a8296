export MOESERVE_COMMIT=f981795c7ded3bbe89cb27b95d9b4891558aeaef
mkdir -p $OUT/w
OUT=$OUT/w BASE_COMMIT=3fe9ee7 WORKLOADS=throughput SUITE_S=230 RUN_S=560 bash benchmarks/run_fp8_pair.sh ab
tar czf $OUT/call4.tgz -C $OUT/w .
