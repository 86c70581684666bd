# session 4, call 1: HEAD (877a696) mamba2 vs mamba-ssm, hybrid_moe baseline profile, GPU tests
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step new_mamba2 120 python benchmarks/peers.py --archs mamba2 --variants compile+cast --out $OUT/peers
step moe 150 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+cast --profile --out $OUT/moe.json
step gpu_tests 250 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head; grep -E "x$|^mamba|^hybrid" $LOG
