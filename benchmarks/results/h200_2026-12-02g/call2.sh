# session 7, call 2: our Triton gated norm: GPU tests, micro-benchmark, hybrid_moe step (fresh caches)
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
W=/tmp/w; mkdir -p $W
step tests 150 python -m pytest -n 4 -q -p no:cacheprovider -W ignore tests/gpu/test_gated_norm_kernel.py tests/gpu/test_cuda_kernels.py tests/gpu/test_fp8_compile.py::test_block_with_gpu_kernels_traces_as_one_graph -rfE
step micro 60 python devrun/norm_micro.py
step moe 240 env TORCHINDUCTOR_CACHE_DIR=$W/ca TRITON_CACHE_DIR=$W/ta python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --profile --out $OUT/moe.json
(cd $W/ca && find . -name "*.py" | tar czf $OUT/inductor.tgz -T -)
grep -E "^== |passed|failed|^FAILED|^ERROR" $LOG; grep -E "ms$|rel err" $LOG; grep -E "by kind|^hybrid|^arch" $LOG
