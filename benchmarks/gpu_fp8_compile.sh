#!/bin/bash
# One GPU measurement of the compile / cast-once / FP8 work (docs/benchmarks.md, "Compile and FP8"):
# the GPU tests of those paths, then the training-step table.
#   bash benchmarks/gpu_fp8_compile.sh OUT_DIR [ARCHS] [VARIANTS] [PYTEST_FILTER]
# TEST_S / BENCH_S: time limits (s) of the two parts; what finished is kept (JSON written per row).
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-runs/gpu_fp8_compile}
ARCHS=${2:-llama}
VARIANTS=${3:-eager,compile+copies,compile+copies+fp8-tensorwise}
FILTER=${4:-not inductor}
mkdir -p "$OUT"
timeout "${TEST_S:-100}" python -m pytest -q -p no:cacheprovider -W ignore tests/gpu/test_fp8_compile.py -k "$FILTER" -rA 2>&1 \
    | grep -v DEBUG > "$OUT/pytest.txt"
timeout "${BENCH_S:-600}" python benchmarks/compile_fp8.py --archs "$ARCHS" --variants "$VARIANTS" --out "$OUT/compile_fp8.json" \
    > "$OUT/compile_fp8.txt" 2>&1
grep -E "passed|failed|Error|^E |^\.|PASS|FAIL" "$OUT/pytest.txt" | tail -15
tail -6 "$OUT/compile_fp8.txt"
