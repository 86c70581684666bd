source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step conv_tests 150 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu/test_document_masking_cuda.py tests/gpu/test_fp8_compile.py -rfE
step peers_mamba2 110 python benchmarks/peers.py --archs mamba2 --variants compile+cast --profile --out $OUT/peers
step prof_hm 130 python devrun/prof_detail.py "hybrid_moe compile+cast"
step intra 80 python benchmarks/compile_fp8.py --archs intra_hybrid --variants compile+cast --out $OUT/intra.json
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -30; grep -B1 -A8 "kernels per step" $LOG | grep -E "kernels per|by kind"; grep -A3 "^model " $LOG | tail -3; grep -E "^(intra_hybrid) |^ROW" $LOG
