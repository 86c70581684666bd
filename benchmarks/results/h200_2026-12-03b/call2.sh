source devrun/prelude.sh
A="--archs intra_hybrid,llama,mamba2 --lengths 2048,8192 --variants compiled --no-hf"
step base 70 python devrun/exp.py none $A --out $OUT/base
step gnref 70 python devrun/exp.py gnref $A --out $OUT/gnref
step embed 70 python devrun/exp.py gnref,embed $A --out $OUT/embed
step coord 120 python devrun/exp.py coord,gnref,embed $A --out $OUT/coord
step autotune 180 python devrun/exp.py autotune,gnref,embed $A --out $OUT/autotune
step decode_tests 90 python -m pytest -n 6 -q -p no:warnings tests/gpu/test_decode_cuda.py
grep -v "Warning\|warn\|^$\|This call\|File \|cos, sin\|torch._dynamo\|AUTOTUNE\|triton_\|SingleProcess\|mm(" $LOG | grep -v "^    op " | grep -E "^(=====|==|\[|llama|mamba2|intra|[0-9]+ passed|FAILED|E )" | tail -n 80
