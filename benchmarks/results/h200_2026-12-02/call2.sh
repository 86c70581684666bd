source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
(python -m data_pipeline.demo_corpus --out data/demo --workers 8 > $OUT/demo_corpus.log 2>&1; echo "demo corpus exit $?" >> $OUT/demo_corpus.log) &
step gpu_tests 230 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=12
wait
step docmask 240 python benchmarks/document_masking.py --data data/demo --archs mamba2,intra_hybrid --doc-len '' --flex-options '' --out $OUT/document_masking.json
step prof 50 python devrun/prof_mask.py mamba2
saveautotune
grep -E "^==|passed|failed|FAILED|Error|on/off|kernel ms|^(mamba2|intra_hybrid|llama) " $LOG | tail -40
