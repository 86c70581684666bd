source devrun/prelude.sh
step ab_new 150 python benchmarks/inference.py --archs llama,mamba2,intra_hybrid --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_new
(cd devrun/base && PYTHONPATH=$PWD:/tmp/site timeout 150 python benchmarks/inference.py --archs llama,mamba2,intra_hybrid --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_base >> $LOG 2>&1; echo "== ab_base exit $?" | tee -a $LOG)
step decode_tests 150 python -m pytest -n 6 -q -p no:warnings tests/gpu/test_decode_cuda.py
step trace 120 python devrun/decode_trace.py intra_hybrid,llama
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo" $LOG | grep -v "^    op " | tail -n 80
