source devrun/prelude.sh
step attn_new 90 python devrun/attn_ab.py api new
(cd devrun/base && PYTHONPATH=$PWD:/tmp/site timeout 90 python ../attn_ab.py api base >> $LOG 2>&1; echo "== attn_base exit $?" | tee -a $LOG)
step sweep 150 python devrun/attn_ab.py sweep new
step ab_new 110 python benchmarks/inference.py --archs intra_hybrid,llama --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_new
(cd devrun/base && PYTHONPATH=$PWD:/tmp/site timeout 110 python benchmarks/inference.py --archs intra_hybrid,llama --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_base >> $LOG 2>&1; echo "== ab_base exit $?" | tee -a $LOG)
step gpu_tests 200 python -m pytest -n 6 -q -p no:warnings -rfE tests/gpu/test_decode_cuda.py tests/gpu/test_sampling_cuda.py
grep -E "^(=====|==|new |base |sweep |llama|mamba2|intra|[0-9]+ passed|FAILED|ERROR|E  )|tok|passed|failed" $LOG | grep -v Warning | tail -n 80
