source benchmarks/results/h200_2026-12-02b/prelude.sh
step micro 240 python devrun/pdl_micro.py
LAYERS=26 step micro26 240 python devrun/pdl_micro.py
grep -E "us/layer|bound|ERROR|^==" $LOG
