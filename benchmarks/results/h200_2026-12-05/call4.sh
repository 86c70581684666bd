source benchmarks/results/h200_2026-12-02b/prelude.sh
t0=$SECONDS
[ -f data/demo/manifest.json ] || python -m data_pipeline.demo_corpus --out data/demo --workers 8 > /dev/null 2>&1
echo "== demo corpus in $((SECONDS-t0)) s"
t0=$SECONDS
timeout 110 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --vocab 8192 --out $OUT/hybrid_moe_v8k.json > $OUT/step_v8k.log 2>&1
echo "== step exit $? in $((SECONDS-t0)) s"
t0=$SECONDS
timeout 150 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hybrid_moe_1b \
  --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true --train.val_every=0 \
  --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda > $OUT/trainer.log 2>&1
echo "== trainer exit $? in $((SECONDS-t0)) s"
tail -2 $OUT/step_v8k.log; tail -3 $OUT/hybrid_moe_1b/metrics.jsonl | cut -c1-220
left=$((330 - SECONDS)); [ $left -gt 20 ] && { timeout $left python benchmarks/results/h200_2026-12-05/cumsum_check.py > $OUT/cumsum_check.log 2>&1; echo "== cumsum check exit $?"; grep -E "ok|FAILED" $OUT/cumsum_check.log; }
