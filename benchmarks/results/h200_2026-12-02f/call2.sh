# session 6, call 2: conv backward_pre variants (looped, taps as a dimension) A/B; a profiled hybrid_moe
# step with the conv ops tagged needs_fixed_stride_order (are Inductor's two copies per layer gone?)
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step ab 150 python devrun/conv_bwd_ab.py
step prof 300 python devrun/prof_copies.py hybrid_moe
saveautotune
grep -E "^== " $LOG; grep -E "^(head|nodw|loop|3d|fwd)" $LOG; grep -E "conv_silu|split_with_sizes|step_ms" $LOG | head -20
