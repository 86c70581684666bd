source devrun/prelude.sh; export TRITON_CACHE_AUTOTUNING=1; timeout 150 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+cast --vocab 8192 --out $OUT/hybrid_moe_v8k.json
