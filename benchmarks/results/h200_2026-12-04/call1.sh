source benchmarks/results/h200_2026-12-02b/prelude.sh
python -c "import torch, triton; import torch._inductor.config as c; print(torch.__version__, triton.__version__, 'enable_pdl' in dir(c.triton), torch.version.cuda)" | tee -a $LOG
step micro 240 python devrun/pdl_micro.py
A="--archs mamba2,intra_hybrid --lengths 2048 --variants compiled --no-hf"
step base 120 python benchmarks/inference.py $A --out $OUT/base
TORCHINDUCTOR_ENABLE_PDL=1 step inductor_pdl 120 python benchmarks/inference.py $A --out $OUT/pdl
tail -n 45 $LOG
