source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
python -m data_pipeline.demo_corpus --out data/demo --workers 14 > /dev/null 2>&1 &
step fp8_compile_tests 100 python -m pytest -n 4 -q -p no:cacheprovider -W ignore tests/gpu/test_fp8_compile.py -rfE
step hm_intra 140 python benchmarks/compile_fp8.py --archs hybrid_moe,intra_hybrid --variants compile+cast --out $OUT/hm_intra.json
step peers_mamba2 85 python benchmarks/peers.py --archs mamba2 --variants compile+cast --profile --out $OUT/peers
wait
step trainer_hm 60 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hm1b \
   --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true --train.val_every=0 \
   --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
grep -E "^==|^FAILED|^ERROR" $LOG | head; grep -nE "^[.sFEx]+ *\[" $LOG; grep -B1 -A8 "kernels per step" $LOG | grep -E "kernels per|by kind"; grep -A4 "^model " $LOG | tail -4; grep -E "^(hybrid_moe|intra_hybrid) " $LOG; tail -2 $OUT/hm1b/metrics.jsonl | cut -c1-160
