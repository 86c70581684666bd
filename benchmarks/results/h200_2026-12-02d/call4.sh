# session 4, call 4: GPU tests at HEAD (MoE combine, AdamW kernel tolerances), hybrid_moe and intra_hybrid MFU (copies), llama FP8 with copies
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step gpu_tests 150 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=5
step moe 80 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --profile --out $OUT/moe.json
step intra 55 python benchmarks/compile_fp8.py --archs intra_hybrid --variants compile+copies --out $OUT/intra.json
step fp8 110 python benchmarks/compile_fp8.py --archs llama --variants compile+copies,compile+copies+fp8-tensorwise --out $OUT/fp8.json
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -20; grep -E "^hybrid|^intra|^llama|^arch|by kind" $LOG
