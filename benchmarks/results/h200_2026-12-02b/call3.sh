source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
python -m data_pipeline.demo_corpus --out data/demo --workers 14 > /dev/null 2>&1 &
step gpu_tests 190 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
step peers 150 python benchmarks/peers.py --variants compile+cast --profile --out $OUT/peers
step hm_intra 95 python benchmarks/compile_fp8.py --archs hybrid_moe,intra_hybrid --variants compile+cast --out $OUT/hm_intra.json
wait
step trainer_hm 80 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hm1b \
   --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true --train.val_every=0 \
   --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -30; grep -B1 -A8 "kernels per step" $LOG | grep -E "kernels per|by kind"; grep -A8 "^model " $LOG | tail -8; grep -E "^(hybrid_moe|intra_hybrid) " $LOG; tail -3 $OUT/hm1b/metrics.jsonl | cut -c1-200
