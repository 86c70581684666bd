source devrun/prelude.sh
step gemv 420 python devrun/gemv_micro.py
grep -v Warning $LOG | tail -n 30
