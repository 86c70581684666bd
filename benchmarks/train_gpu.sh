#!/bin/bash
# Trainer on one GPU, end to end through pretrain/main.py (not a test: it measures).
#   bash benchmarks/train_gpu.sh [OUT_DIR]          STEPS=300 by default for the 1B run
# 1) demo corpus; 2) tiny hybrid_moe smoke run with checkpoints, then a resume to more steps
# (CUDA RNG, fused AdamW and bf16 autocast paths); 3) 1B hybrid_moe, sequence 8192, micro-batch 2,
# activation checkpointing, no checkpoint writes: tokens/s and MFU in OUT/hm1b/metrics.jsonl.
set -euo pipefail
# The GPU box runs from a copy of the checkout without installing it: the repository root is the package root.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${1:-runs/train_gpu}
STEPS=${STEPS:-300}
mkdir -p "$OUT"
python -m data_pipeline.demo_corpus --out "$OUT/data" --workers 8
common=(--data "$OUT/data" --logging.log_every=10 --train.device=cuda)
python pretrain/main.py --arch hybrid_moe --size tiny --run-dir "$OUT/tiny" "${common[@]}" \
    --data.seq_len=256 --train.micro_batch_size=8 --train.steps=30 --train.val_every=15 --checkpoint.every=15
python pretrain/main.py --arch hybrid_moe --size tiny --run-dir "$OUT/tiny" "${common[@]}" \
    --data.seq_len=256 --train.micro_batch_size=8 --train.steps=40 --train.val_every=15 --checkpoint.every=15
python pretrain/main.py --arch hybrid_moe --size 1b --run-dir "$OUT/hm1b" "${common[@]}" \
    --data.seq_len=8192 --train.micro_batch_size=2 --train.steps="$STEPS" --train.activation_checkpointing=true \
    --train.val_every=0 --checkpoint.enabled=false --optim.lr=6e-4
