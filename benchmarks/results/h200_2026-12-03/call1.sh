source devrun/prelude.sh
nvidia-smi --query-gpu=name,memory.used --format=csv >> $LOG
step trace 400 python devrun/decode_trace.py mamba2,intra_hybrid,llama
tail -n 120 $LOG
