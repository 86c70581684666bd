# session 4, call 2: GPU tests (graph-break fix, fused AdamW kernel), hybrid_moe cast vs copies (profiled), mamba2 vs mamba-ssm
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step gpu_tests 200 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=5
step moe 230 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+cast,compile+copies --profile --out $OUT/moe.json
step mamba2 140 python benchmarks/peers.py --archs mamba2 --variants compile+copies --out $OUT/peers
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -20; grep -E "x$|^mamba|^hybrid|^arch" $LOG
