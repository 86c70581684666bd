source benchmarks/results/h200_2026-12-02b/prelude.sh
t0=$SECONDS
timeout 280 python benchmarks/compile_fp8.py --archs llama --variants compile+copies,compile+copies+fp8-tensorwise --out $OUT/fp8_llama.json > $OUT/fp8_llama.log 2>&1
echo "== llama exit $? in $((SECONDS-t0)) s"
t0=$SECONDS
timeout $((560 - SECONDS)) python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies,compile+copies+fp8-tensorwise --out $OUT/fp8_moe.json > $OUT/fp8_moe.log 2>&1
echo "== hybrid_moe exit $? in $((SECONDS-t0)) s"
tail -4 $OUT/fp8_llama.log; tail -4 $OUT/fp8_moe.log
