source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
python -m data_pipeline.demo_corpus --out data/demo --workers 14 > /dev/null 2>&1 &
step peers 250 python benchmarks/peers.py --variants compile+cast --profile --out $OUT/peers
step swa_llama 140 python benchmarks/compile_fp8.py --archs swa,llama --variants compile+cast --out $OUT/swa_llama.json
wait
step trainer_hm 140 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hm1b \
   --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=40 --train.compile=true --train.val_every=0 \
   --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
saveautotune
grep -E "^==" $LOG; grep -A30 "kernels per step" $LOG | tail -45; grep -E "^(arch|swa|llama) " $LOG | tail -4; tail -5 $OUT/hm1b/metrics.jsonl | cut -c1-300
