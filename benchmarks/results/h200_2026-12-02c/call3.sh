source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
python -m data_pipeline.demo_corpus --out data/demo --workers 10 > /dev/null 2>&1 &
step gpu_tests 250 python -m pytest -n 6 -q -p no:cacheprovider -W ignore tests/gpu -rfE --durations=8
wait
step peers_llama 90 python benchmarks/peers.py --archs llama --variants compile+cast --out $OUT/peers
step step_hybrid_moe_v8k 80 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+cast --vocab 8192 --out $OUT/hybrid_moe_v8k.json
step trainer_hybrid_moe 95 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hybrid_moe_1b \
   --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true --train.val_every=0 \
   --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
TORCH_LOGS=output_code timeout 45 python devrun/mamba_code.py > $OUT/mamba2_block_output_code.txt 2>&1; echo "code $?"
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -30; grep -E "^hybrid_moe " $LOG; grep -A3 "^model " $LOG; grep "x$" $LOG; tail -2 $OUT/hybrid_moe_1b/metrics.jsonl | cut -c1-200
