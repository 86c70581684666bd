"""Long context on one GPU: 1B inter- and intra-hybrid training steps at 8K/16K/32K tokens,
micro-batch 1, full activation checkpointing, the chunked loss (never
full logits), bf16 parameters cast once per step; tokens/s and peak memory per row.

    python benchmarks/long_context.py [--archs inter_hybrid,intra_hybrid] [--seqs 8192,16384,32768]
                                      [--compile] [--out long_context.json]

Writes JSON after every row and prints a table last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, run as a script or imported by path

from gpu_model import positive_ints, record_row, require_cuda, train_step_throughput  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="inter_hybrid,intra_hybrid")
    ap.add_argument("--seqs", type=positive_ints, default="8192,16384,32768")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out", default="long_context.json")
    args = ap.parse_args()
    require_cuda("long_context.py", "it measures 1B training steps and their peak GPU memory")
    rows = []
    for arch in args.archs.split(","):
        for seq in args.seqs:
            record_row(rows, args.out, arch, lambda: train_step_throughput(
                arch, batch=1, seq=seq, compile=args.compile, precision="copies", activation_checkpointing=True), seq=seq)
    print(f"{'arch':<14}{'seq':>7}{'step ms':>10}{'tokens/s':>11}{'MFU764':>8}{'peak GiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<14}{r['seq']:>7}  {r['error']}")
        else:
            print(f"{r['arch']:<14}{r['seq']:>7}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11,.0f}{r['mfu']:>8.1%}"
                  f"{r['peak_mem_gib']:>10.1f}")


if __name__ == "__main__":
    main()
