source devrun/prelude.sh
step micro 150 python devrun/experts_micro.py
mkdir -p /tmp/base && git archive de6ab9a | tar x -C /tmp/base
step new_bf16 200 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies --out $OUT/new_bf16.json
step new_fp8 200 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies+fp8-tensorwise --out $OUT/new_fp8.json
(cd /tmp/base && PYTHONPATH=/tmp/base:/tmp/site step base_fp8 200 python benchmarks/compile_fp8.py --archs hybrid_moe --variants compile+copies+fp8-tensorwise --out $OUT/base_fp8.json)
grep -v "Warning\|warn" $LOG | grep -E "^(=====|==|path|bf16|fp8|---|hybrid_moe|arch| +[0-9]+ +[0-9]+ )" | tail -n 60
