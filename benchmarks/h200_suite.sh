#!/bin/bash
# Every GPU measurement of record, in two parts that fit one device call each (see docs/benchmarks.md):
#   bash benchmarks/h200_suite.sh 1 OUT   # GPU tests; peers (ours eager and compiled vs transformers / mamba-ssm);
#                                         # compile / cast / FP8 steps of hybrid_moe and llama
#   bash benchmarks/h200_suite.sh 2 OUT   # GPU tests; mamba2 compiled vs mamba-ssm; document masking on/off;
#                                         # decode (T13 shape); activation-memory calibration
# Each step has a time limit (seconds, overridable) and writes its log and JSON under OUT; a step that
# runs out of time keeps what it finished. The last lines printed are the tables.
set -uo pipefail
part=${1:?part 1 or 2}
out=${2:-runs/h200}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
}
if [ "$part" = 1 ]; then
    step gpu_tests "${GPU_TESTS_S:-200}" python -m pytest -q -p no:cacheprovider -W ignore tests/gpu -rfE
    step peers "${PEERS_S:-220}" python benchmarks/peers.py --variants eager,compile+cast --out "$out/peers"
    step compile_fp8 "${COMPILE_FP8_S:-150}" python benchmarks/compile_fp8.py --archs hybrid_moe,llama \
        --variants compile+cast,compile+cast+fp8-tensorwise --out "$out/compile_fp8.json"
    tail -4 "$out/gpu_tests.log"; tail -12 "$out/peers.log"; tail -6 "$out/compile_fp8.log"
else
    step gpu_tests "${GPU_TESTS_S:-190}" python -m pytest -q -p no:cacheprovider -W ignore tests/gpu -rfE
    step peers_mamba "${PEERS_S:-90}" python benchmarks/peers.py --archs mamba2 --variants compile+cast --out "$out/peers"
    python -m data_pipeline.demo_corpus --out "$out/demo" > /dev/null 2>&1
    step document_masking "${DOCMASK_S:-100}" python benchmarks/document_masking.py --data "$out/demo" --out "$out/document_masking.json"
    step inference "${INFERENCE_S:-120}" python benchmarks/inference.py --lengths 2048,8192,32768 --out "$out/inference"
    step activation_memory "${ACT_S:-55}" python benchmarks/activation_memory.py --archs hybrid_moe --out "$out/activation_memory.json"
    tail -4 "$out/gpu_tests.log"; tail -5 "$out/peers_mamba.log"; tail -8 "$out/document_masking.log"
    tail -16 "$out/inference.log"; tail -9 "$out/activation_memory.log"
fi
