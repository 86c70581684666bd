source devrun/prelude.sh; step prof 200 python devrun/prof_copies.py hybrid_moe
