source benchmarks/results/h200_2026-12-02b/prelude.sh
cd $PWD; git log --oneline -1 > $OUT/head.txt 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> $OUT/head.txt
python -c "import torch, triton; print(torch.__version__, triton.__version__)" >> $OUT/head.txt
t0=$SECONDS
timeout 330 python -m pytest -n 8 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=12 --junitxml=$OUT/gpu_tests.xml > $OUT/gpu_tests.log 2>&1
echo "== gpu tests exit $? in $((SECONDS-t0)) s"
t0=$SECONDS
timeout $((585 - SECONDS)) python benchmarks/inference.py --archs llama,mamba2,inter_hybrid,intra_hybrid --lengths 2048,8192,32768 --out $OUT/inference > $OUT/inference.log 2>&1
echo "== inference exit $? in $((SECONDS-t0)) s"
tail -5 $OUT/gpu_tests.log; tail -25 $OUT/inference.log
