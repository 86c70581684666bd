source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step gpu_tests 210 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
step prof_mamba2 75 python devrun/prof_detail.py "mamba2 compile+cast"
step prof_peer 60 python devrun/prof_detail.py mamba_ssm_mamba2
step prof_hm 80 python devrun/prof_detail.py "hybrid_moe compile+cast"
step prof_intra 70 python devrun/prof_detail.py "intra_hybrid compile+cast"
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -30; grep -E "^ROW|^####" $LOG
