# session 6, call 4: the whole GPU suite at c51fd81; mamba2 compile+copies with the new conv
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step gpu_tests 330 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
step mamba2 150 python benchmarks/compile_fp8.py --archs mamba2 --variants compile+copies --out $OUT/mamba2.json
grep -E "^== |passed|failed|^FAILED|^ERROR" $LOG; grep -E "^mamba2|^arch" $LOG
