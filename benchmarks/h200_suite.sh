#!/bin/bash
# Every GPU measurement of record, in two parts that fit one device call each (see docs/benchmarks.md):
#   bash benchmarks/h200_suite.sh 1 OUT   # GPU tests; peers (ours eager and compiled vs transformers / mamba-ssm);
#                                         # compile / cast / FP8 steps of hybrid_moe and llama
#   bash benchmarks/h200_suite.sh 2 OUT   # eager + compiled steps of every 1B arch; decode (T13 shape); document
#                                         # masking on/off; long context; activation-memory calibration
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
    step archs "${ARCHS_S:-170}" python benchmarks/compile_fp8.py --archs mamba2,intra_hybrid,inter_hybrid,swa \
        --variants eager,compile+cast --out "$out/archs.json"
    python -m data_pipeline.demo_corpus --out "$out/demo" > /dev/null 2>&1
    step document_masking "${DOCMASK_S:-110}" python benchmarks/document_masking.py --data "$out/demo" --out "$out/document_masking.json"
    step inference "${INFERENCE_S:-130}" python benchmarks/inference.py --lengths 2048,8192,32768 --out "$out/inference"
    step long_context "${LONG_S:-60}" python benchmarks/long_context.py --archs intra_hybrid --seqs 32768 --out "$out/long_context.json"
    tail -10 "$out/archs.log"; tail -8 "$out/document_masking.log"; tail -16 "$out/inference.log"; tail -4 "$out/long_context.log"
fi
