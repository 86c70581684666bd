# session 6, call 1: conv backward_pre variants (A/B), hybrid_moe compile+copies with the conv ops tagged
# needs_fixed_stride_order against HEAD (devrun/base), each in its own process
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step ab 150 python devrun/conv_bwd_ab.py
step moe_tags 190 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_tags.json
cd devrun/base && PYTHONPATH=$PWD:/tmp/site step moe_base 190 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/moe_base.json; cd ../..
savecache; saveautotune
grep -E "^== " $LOG; grep -E "^(head|nodw|loop)" $LOG; grep -E "^hybrid|^arch" $LOG
