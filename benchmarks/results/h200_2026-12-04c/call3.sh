source benchmarks/results/h200_2026-12-02b/prelude.sh
export OUT
step gemv_stream 300 python devrun/gemv_stream.py
sed -n '/===== gemv_stream/,$p' $LOG | tail -n 60
