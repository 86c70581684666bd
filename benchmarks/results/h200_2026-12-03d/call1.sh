source devrun/prelude.sh
step tests 300 python -m pytest -n 4 -q -p no:warnings -rfEs tests/gpu/test_grouped_mm_float8_cuda.py tests/gpu/test_fp8_compile.py
step micro 200 python devrun/experts_micro.py
grep -E "^(=====|==|[0-9]+ passed|FAILED|ERROR|E  |path|bf16|fp8)" $LOG | tail -n 60
