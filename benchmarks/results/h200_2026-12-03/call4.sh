source devrun/prelude.sh
step inference 430 python benchmarks/inference.py --archs llama,swa,mamba2,inter_hybrid,intra_hybrid --variants compiled,compiled-split-k --profile --out $OUT/inference
step decode_tests 140 python -m pytest -n 6 -q -p no:warnings tests/gpu/test_decode_cuda.py
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo" $LOG | grep -v "^    op " | tail -n 100
