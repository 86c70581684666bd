source devrun/prelude.sh
step argmax 60 python devrun/argmax_micro.py
step ab_new 130 python benchmarks/inference.py --archs llama,mamba2,intra_hybrid --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_new
(cd devrun/base && PYTHONPATH=$PWD:/tmp/site timeout 130 python benchmarks/inference.py --archs llama,mamba2,intra_hybrid --lengths 2048,8192 --variants compiled --no-hf --out $OUT/ab_base >> $LOG 2>&1; echo "== ab_base exit $?" | tee -a $LOG)
step gpu_tests 270 python -m pytest -n 6 -q -p no:warnings tests/gpu
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo" $LOG | grep -v "^    op " | tail -n 100
