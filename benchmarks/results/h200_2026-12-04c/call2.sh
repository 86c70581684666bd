source benchmarks/results/h200_2026-12-02b/prelude.sh
export OUT
step persistent 300 python devrun/persistent_micro.py --budget 270
sed -n '/===== persistent/,$p' $LOG | tail -n 40
