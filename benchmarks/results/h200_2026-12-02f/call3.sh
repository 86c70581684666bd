# session 6, call 3: the conv kernels with taps as a dimension (backward_pre walks 1024 positions, one
# reduction) and the ops tagged needs_fixed_stride_order: GPU conv tests, micro-benchmark, hybrid_moe step
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step conv_tests 120 python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_conv_kernel.py tests/gpu/test_cuda_kernels.py::test_mamba2_mixer_1b_dims_bf16_seq8192_output_and_grads tests/gpu/test_document_masking_cuda.py::test_masked_model_fast_matches_reference_and_documents_alone_bf16 "tests/gpu/test_fp8_compile.py::test_block_with_gpu_kernels_traces_as_one_graph" -rfE
step conv 100 python benchmarks/conv_kernel.py --tiles forward=64x64x4,backward_input=64x64x4 --tiles backward_pre=16x64x4x2048 --tiles backward_pre=8x128x4x512,backward_input=16x128x4 --out $OUT/conv.json
step moe 220 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe.json
saveautotune
grep -E "^== |passed|failed|^FAILED|^ERROR" $LOG; grep -A12 "^kernel " $LOG; grep -E "^hybrid|^arch" $LOG
