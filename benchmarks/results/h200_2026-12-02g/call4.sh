# session 7, call 4: hybrid_moe again at 20a3366 (its own process, fresh caches) to confirm call 2;
# mamba2 with the profile (did its step gain from the gated norm kernels?)
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/w; mkdir -p $W
step moe 230 env TORCHINDUCTOR_CACHE_DIR=$W/cm TRITON_CACHE_DIR=$W/tm python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe.json
step mamba2 170 env TORCHINDUCTOR_CACHE_DIR=$W/c2 TRITON_CACHE_DIR=$W/t2 python benchmarks/compile_fp8.py --archs mamba2 --variants compile+copies --profile --out $OUT/mamba2.json
(cd $W/c2 && find . -name "*.py" | tar czf $OUT/inductor_mamba2.tgz -T -)
grep -E "^== " $LOG; grep -E "by kind|^hybrid|^mamba2|^arch|gated_norm" $LOG
