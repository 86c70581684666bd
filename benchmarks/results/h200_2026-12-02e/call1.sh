# session 5, call 1: the Triton conv kernel (micro-benchmark, GPU tests), hybrid_moe compile+copies with it
# and at 9d55d84 (devrun/base, before the kernel), each in its own process
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step conv 120 python benchmarks/conv_kernel.py --blocks 32x64,32x128,128x32,64x128,16x128 --out $OUT/conv.json
step conv_tests 120 python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_conv_kernel.py "tests/gpu/test_fp8_compile.py::test_block_with_gpu_kernels_traces_as_one_graph" tests/gpu/test_cuda_kernels.py::test_mamba2_mixer_1b_dims_bf16_seq8192_output_and_grads -rfE
step moe_new 125 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_new.json
cd devrun/base && PYTHONPATH=$PWD:/tmp/site step moe_base 125 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_base.json; cd ../..
saveautotune
grep -E "passed|failed|^FAILED|^ERROR|^==" $LOG | head -30; grep -A16 "^kernel " $LOG; grep -E "^hybrid|^arch" $LOG
