source devrun/prelude.sh
step trace 200 python benchmarks/results/h200_2026-12-03/decode_trace.py intra_hybrid,mamba2,llama
ls $OUT
