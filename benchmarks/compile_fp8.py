"""Training-step speed of the compile / cast-once / FP8 options, one process, same GPU (1B dims,
vocab 128,256, sequence 8192, batch 2, fused AdamW; benchmarks/gpu_model.py's step).

    python benchmarks/compile_fp8.py [--archs llama,hybrid_moe] [--variants eager,compile,compile+copies,...]
                                     [--vocab 8192] [--profile] [--out compile_fp8.json]
    python benchmarks/compile_fp8.py --device cpu --preset tiny --seq 32 --archs llama --variants eager \
                                     --profile --out /tmp/compile_fp8.json     # a CPU smoke run

A variant is `+`-joined options: eager (autocast, as gpu_model.py), compile (train.compile), cast
(bf16 parameters cast once per step) or copies (bf16 working copies rewritten by the optimizer: the
trainer's one-GPU setup), fp8-tensorwise / fp8-rowwise (train.fp8), ac (activation checkpointing).
Writes JSON after every row (a time limit keeps what finished); prints a table last with each row's
speed-up over the arch's first variant. `--profile`: where each row's step goes
(top kernels, top ops by input shape, shares by kind; `gpu_model.profile_summary`), before the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_model, run as a script or imported by path

from gpu_model import profile_lines, record_row, train_step_throughput  # noqa: E402

from parallel.float8 import FP8_RECIPES  # noqa: E402

FP8_PARTS = {f"fp8-{recipe}" for recipe in FP8_RECIPES if recipe != "none"}


def options(variant: str) -> dict:
    parts = set(variant.split("+")) - {"eager"}
    fp8 = next((p.split("-", 1)[1] for p in parts if p.startswith("fp8-")), "none")
    known = {"compile", "cast", "copies", "ac", *FP8_PARTS}
    if parts - known or {"cast", "copies"} <= parts or len(parts & FP8_PARTS) > 1:
        raise SystemExit(f"--variants: {variant}: use eager, compile, one of cast / copies, ac, one of "
                         f"{' / '.join(sorted(FP8_PARTS))}")
    precision = "copies" if "copies" in parts else "cast" if "cast" in parts else "autocast"
    return {"compile": "compile" in parts, "precision": precision, "fp8": fp8,
            "activation_checkpointing": "ac" in parts}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", default="llama,hybrid_moe")
    ap.add_argument("--variants", default="eager,compile,compile+copies,compile+copies+fp8-tensorwise")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=None,
                    help="vocabulary size instead of the preset's (128,256), e.g. the demo corpus's 8192 to compare "
                         "with a trainer run on it")
    ap.add_argument("--profile", action="store_true", help="per row, where the step's time goes")
    ap.add_argument("--out", default="compile_fp8.json")
    args = ap.parse_args(argv)
    variants = {variant: options(variant) for variant in args.variants.split(",")}  # all checked before any row
    rows = []
    for arch in args.archs.split(","):
        for variant, opts in variants.items():
            r = record_row(rows, args.out, arch, lambda: train_step_throughput(
                arch, args.batch, args.seq, args.preset, args.device, **opts, vocab_size=args.vocab,
                profile=args.profile),
                variant=variant)
            print(json.dumps({k: v for k, v in r.items() if k not in ("profile", "ops")}), flush=True)
    for r in rows:
        if r.get("profile"):
            print("\n".join(profile_lines(f"{r['arch']} {r['variant']}", r)))
    print(f"{'arch':<12}{'variant':<34}{'step ms':>9}{'tokens/s':>11}{'MFU764':>8}{'x first':>8}{'GiB':>7}")
    base: dict[str, float] = {}
    for r in rows:
        if "error" in r:
            print(f"{r['arch']:<12}{r['variant']:<34}{r['error']}")
            continue
        first = base.setdefault(r["arch"], r["tokens_per_s"])
        peak = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"  # None on the CPU
        print(f"{r['arch']:<12}{r['variant']:<34}{r['step_ms']:>9.1f}{r['tokens_per_s']:>11,.0f}{r['mfu']:>8.1%}"
              f"{r['tokens_per_s'] / first:>8.2f}{peak:>7}")


if __name__ == "__main__":
    main()
