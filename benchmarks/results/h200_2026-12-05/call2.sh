source benchmarks/results/h200_2026-12-02b/prelude.sh
python -c "from pretrain.model.ops.library import _mamba_ssd_functions as f; import torchao, tomli_w, webdataset; print(\"wheels ok\", f() is not None)" 2>&1 | tail -1
t0=$SECONDS
timeout 300 python -m pytest -n 8 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=12 --junitxml=$OUT/gpu_tests.xml > $OUT/gpu_tests.log 2>&1
echo "== gpu tests exit $? in $((SECONDS-t0)) s"
t0=$SECONDS
timeout $((590 - SECONDS)) python benchmarks/peers.py --variants compile+copies --out $OUT/peers > $OUT/peers.log 2>&1
echo "== peers exit $? in $((SECONDS-t0)) s"
tail -4 $OUT/gpu_tests.log; tail -14 $OUT/peers.log
