source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step ce_tests 120 python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_cuda_kernels.py -k "entropy or xent" -rfE
step ce_micro 100 python devrun/ce_micro.py
step peers 230 python benchmarks/peers.py --variants compile+cast --profile --out $OUT/peers
step hm_intra 150 python benchmarks/compile_fp8.py --archs hybrid_moe,intra_hybrid --variants compile+cast --out $OUT/hm_intra.json
step llama_fp8 100 python benchmarks/compile_fp8.py --archs llama --variants compile+cast,compile+cast+fp8-tensorwise --out $OUT/llama_fp8.json
saveautotune
grep -E "^==|passed|failed" $LOG; grep -E "ms .* GiB" $LOG; grep -B1 -A8 "kernels per step" $LOG | grep -E "kernels per|by kind"; grep -A8 "^model " $LOG | tail -8; grep -E "^(arch|llama|hybrid_moe|intra_hybrid) " $LOG
