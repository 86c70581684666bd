# session 4, call 3: AdamW kernel test + trainer GPU tests, detailed copy profile of hybrid_moe, llama vs transformers, trainer vs step
source devrun/prelude.sh
export TRITON_CACHE_AUTOTUNING=1
python -m data_pipeline.demo_corpus --out data/demo --workers 10 > /dev/null 2>&1 &
step gpu_tests 120 python -m pytest -n 3 -q -p no:cacheprovider -W ignore tests/gpu/test_adamw_kernel.py tests/gpu/test_trainer_cuda.py tests/gpu/test_fp8_compile.py -rfE
step prof 150 python devrun/prof_copies.py hybrid_moe
wait
step peers_llama 100 python benchmarks/peers.py --archs llama --variants compile+copies --out $OUT/peers
step step_hybrid_moe_v8k 80 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --vocab 8192 --out $OUT/hybrid_moe_v8k.json
step trainer_hybrid_moe 95 python pretrain/main.py --arch hybrid_moe --size 1b --data data/demo --run-dir $OUT/hybrid_moe_1b \
   --data.seq_len=8192 --train.micro_batch_size=2 --train.steps=30 --train.compile=true --train.val_every=0 \
   --checkpoint.enabled=false --logging.log_every=10 --train.device=cuda
saveautotune
grep -E "^==|passed|failed|^FAILED|^ERROR" $LOG | head -30; grep -E "^hybrid_moe |step_ms" $LOG; grep -A3 "^model " $LOG; grep "x$" $LOG; tail -2 $OUT/hybrid_moe_1b/metrics.jsonl | cut -c1-200
