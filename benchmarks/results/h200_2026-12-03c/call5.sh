source devrun/prelude.sh
A="--archs intra_hybrid,mamba2,llama --lengths 2048,8192 --variants compiled --no-hf"
step base 100 python devrun/exp_mk.py none $A --out $OUT/base
step bigpersist 100 python devrun/exp_mk.py bigpersist $A --out $OUT/bigpersist
step multikernel 150 python devrun/exp_mk.py multikernel $A --out $OUT/multikernel
step base2 100 python devrun/exp_mk.py none $A --out $OUT/base2
grep -E "^(=====|==|\[)" $LOG | tail -n 40
