# session 7, call 3: the whole GPU suite at 20a3366 (the gated norm in decode steps and CUDA graphs too);
# mamba2 against mamba-ssm in one process (fresh caches)
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/w; mkdir -p $W
step gpu_tests 330 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
step peers 200 env TORCHINDUCTOR_CACHE_DIR=$W/ca TRITON_CACHE_DIR=$W/ta python benchmarks/peers.py --archs mamba2 --variants compile+copies --out $OUT/peers
grep -E "^== |passed|failed|^FAILED|^ERROR" $LOG; grep -E "^mamba|^arch|^model|ratio|x " $LOG | tail -8
