source benchmarks/results/h200_2026-12-02b/prelude.sh
step gpu_tests 500 python -m pytest -n 8 -q -p no:warnings tests/gpu --junitxml=$OUT/gpu_tests.xml
tail -n 15 $LOG
