#!/bin/bash
# Every GPU measurement of record, in parts that each fit one device call (< 10 min; see docs/benchmarks.md):
#   bash benchmarks/h200_suite.sh tests OUT      # the GPU tests (6 xdist workers); decode eager vs compiled (T13 shape)
#   bash benchmarks/h200_suite.sh masking OUT    # document masking on/off, demo corpus: mamba2, intra_hybrid, llama
#   bash benchmarks/h200_suite.sh training OUT   # ours compiled vs transformers / mamba-ssm (profiled); MFU of swa,
#                                                # intra_hybrid, hybrid_moe; the trainer's own 1B hybrid_moe run
#                                                # against the benchmark step at the same (demo corpus) vocabulary
#   bash benchmarks/h200_suite.sh fp8 OUT        # compiled bf16 vs FP8 tensorwise / rowwise, llama and hybrid_moe (profiled)
#   bash benchmarks/h200_suite.sh memory OUT     # activation-memory calibration (the dry run's estimate vs peaks)
#   bash benchmarks/h200_suite.sh evaluation OUT # the evaluation suite's T13 at 1B (two 1-step checkpoints)
#   bash benchmarks/h200_suite.sh long OUT       # 1B inter/intra hybrid at 8K-32K on one GPU; FP8 vs bf16 loss, 300 steps
# Each step has a time limit (seconds, overridable by its variable) and writes its log and JSON under OUT; a step
# that runs out of time keeps what it finished. The last lines printed are the tables.
set -uo pipefail
part=${1:?part: tests, masking, training, fp8, memory, evaluation or long}
out=${2:-runs/h200}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_AUTOTUNING=1  # autotune once per shape per call
step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - t0)) s"
}
demo() { [ -f data/demo/manifest.json ] || python -m data_pipeline.demo_corpus --out data/demo --workers 8 > /dev/null 2>&1; }
case "$part" in
tests)
    step gpu_tests "${GPU_TESTS_S:-300}" python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=12
    step inference "${INFERENCE_S:-240}" python benchmarks/inference.py --archs llama,mamba2,inter_hybrid,intra_hybrid \
        --lengths 2048,8192,32768 --profile --out "$out/inference"
    tail -16 "$out/gpu_tests.log"; tail -50 "$out/inference.log" ;;
masking)
    demo
    step document_masking "${DOCMASK_S:-540}" python benchmarks/document_masking.py --data data/demo \
        --archs mamba2,intra_hybrid,llama --doc-len '' --flex-options '' --out "$out/document_masking.json"
    tail -16 "$out/document_masking.log" ;;
training)
    demo
    step peers "${PEERS_S:-180}" python benchmarks/peers.py --variants compile+copies --profile --out "$out/peers"
    step mfu "${MFU_S:-180}" python benchmarks/compile_fp8.py --archs swa,intra_hybrid,hybrid_moe --variants compile+copies \
        --out "$out/mfu.json"
    # the trainer against the benchmark step at the trainer's vocabulary (the demo corpus's 8,192)
    step step_hybrid_moe_v8k "${STEP_S:-90}" python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies \
        --vocab 8192 --out "$out/hybrid_moe_v8k.json"
    step trainer_hybrid_moe "${TRAINER_S:-100}" python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo \
        --run-dir "$out/hybrid_moe_1b" --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true \
        --train.val_every=0 --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
    tail -30 "$out/peers.log"; tail -4 "$out/mfu.log"; tail -1 "$out/step_hybrid_moe_v8k.log"
    tail -2 "$out/hybrid_moe_1b/metrics.jsonl" | cut -c1-150 ;;
fp8)
    step compile_fp8 "${COMPILE_FP8_S:-540}" python benchmarks/compile_fp8.py --archs llama,hybrid_moe \
        --variants compile+copies,compile+copies+fp8-tensorwise,compile+copies+fp8-rowwise --profile --out "$out/compile_fp8.json"
    tail -7 "$out/compile_fp8.log" ;;
memory)
    step activation_memory "${ACT_S:-300}" python benchmarks/activation_memory.py --out "$out/activation_memory.json"
    tail -34 "$out/activation_memory.log" ;;
evaluation)
    demo
    for arch in llama intra_hybrid; do
        step "train_$arch" "${EVAL_TRAIN_S:-150}" python pretrain/main.py --arch "$arch" --size 1b --data data/demo --run-dir "$out/$arch" \
            --data.seq_len=2048 --train.micro_batch_size=1 --train.steps=1 --train.val_every=0
    done
    step evaluate "${EVAL_S:-420}" python -m pretrain.evaluate --checkpoint "$out/llama" "$out/intra_hybrid" --suite inference \
        --out "$out/eval" --inference-batch 4 --inference-prompt 512 --inference-totals 2048,4096,8192,16384,32768
    tail -3 "$out/evaluate.log" ;;
long)
    demo
    step long_context "${LONG_S:-330}" python benchmarks/long_context.py --out "$out/long_context.json"
    step fp8_loss "${FP8_LOSS_S:-220}" python benchmarks/fp8_loss.py --data data/demo --out "$out/fp8_loss"
    tail -8 "$out/long_context.log"; tail -4 "$out/fp8_loss.log" ;;
*) echo "part must be tests, masking, training, fp8, memory, evaluation or long (got $part)" >&2; exit 2 ;;
esac
