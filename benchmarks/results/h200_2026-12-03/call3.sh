source devrun/prelude.sh
step gpu_tests 330 python -m pytest -n 6 -q -p no:warnings tests/gpu
step trace_new 200 python devrun/decode_trace.py mamba2,intra_hybrid,llama
mv $OUT/decode_trace.json $OUT/decode_trace_new.json
step ab_new 150 python benchmarks/inference.py --archs mamba2,intra_hybrid --lengths 2048 --variants compiled,compiled-split-k --no-hf --out $OUT/ab_new
(cd devrun/base && PYTHONPATH=$PWD:/tmp/site timeout 150 python benchmarks/inference.py --archs mamba2,intra_hybrid --lengths 2048 --variants compiled --no-hf --out $OUT/ab_base >> $LOG 2>&1; echo "== ab_base exit $?" | tee -a $LOG)
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo" $LOG | tail -n 90
