source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
(python -m data_pipeline.demo_corpus --out data/demo --workers 8 > $OUT/demo_corpus.log 2>&1; echo "demo corpus exit $?" >> $OUT/demo_corpus.log) &
step mask_tests 170 python -m pytest -n 5 -q -p no:cacheprovider -W ignore tests/gpu/test_document_masking_cuda.py -rfE --durations=8
wait
step docmask 300 python benchmarks/document_masking.py --data data/demo --archs mamba2,intra_hybrid,llama --doc-len '' --flex-options '' --out $OUT/document_masking.json
step prof 70 python devrun/prof_mask.py mamba2
saveautotune
grep -E "^==|passed|failed|FAILED|Error|on/off|kernel ms|^(mamba2|intra_hybrid|llama) " $LOG | tail -40
