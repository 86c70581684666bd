# session 5, call 2: the conv kernels reworked (channel blocks fastest; backward in two kernels, no 4x recompute)
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step conv 80 python benchmarks/conv_kernel.py --blocks 32x64,32x128,16x128,64x32 --out $OUT/conv.json
step conv_tests 100 python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_conv_kernel.py tests/gpu/test_cuda_kernels.py::test_mamba2_mixer_1b_dims_bf16_seq8192_output_and_grads tests/gpu/test_document_masking_cuda.py::test_masked_model_fast_matches_reference_and_documents_alone_bf16 -rfE
step moe_new 120 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_new.json
TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 step moe_coord 170 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_coord.json
saveautotune
grep -E "passed|failed|^FAILED|^ERROR|^==" $LOG | head -30; grep -A12 "^kernel " $LOG; grep -E "^hybrid|^arch" $LOG
