# session 7, call 1: hybrid_moe compile+copies, base vs Inductor coordinate-descent tuning (separate
# processes, separate fresh Inductor caches); the base cache's Triton kernels kept for reading
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/w; mkdir -p $W
step base 260 env TORCHINDUCTOR_CACHE_DIR=$W/ca TRITON_CACHE_DIR=$W/ta python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --profile --out $OUT/moe_base.json
(cd $W/ca && find . -name "*.py" | tar czf $OUT/inductor_base.tgz -T -) ; du -sh $OUT/inductor_base.tgz
step cdt 300 env TORCHINDUCTOR_CACHE_DIR=$W/cb TRITON_CACHE_DIR=$W/tb TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_cdt.json
grep -E "^== " $LOG; grep -E "^hybrid|^arch" $LOG
