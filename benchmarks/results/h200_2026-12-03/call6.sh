source devrun/prelude.sh
step attn_micro 200 python devrun/attn_micro.py
grep -v "Warning\|warn" $LOG | tail -n 12
