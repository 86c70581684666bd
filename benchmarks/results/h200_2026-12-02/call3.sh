source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
step mask_tests 170 python -m pytest -n 5 -q -p no:cacheprovider -W ignore tests/gpu/test_document_masking_cuda.py -rfE --durations=10
step long_context 300 python benchmarks/long_context.py --out $OUT/long_context.json
saveautotune
grep -E "^==|passed|failed|FAILED|^E  |Error" $LOG | tail -20; tail -8 $LOG
