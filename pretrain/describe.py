"""`python -m pretrain.describe --arch A --size S [--ratio 1:3] [--placement front] [--seq-len 8192]
[--json]`: layer pattern, parameters, FLOPs per token and inference-cache size of presets, from the
same config `build_model` uses."""

from __future__ import annotations

import argparse
import json
import sys

from pretrain.accounting import report
from pretrain.model.presets import ARCHS, SIZES, model_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.describe", description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", default="all", choices=("all", *ARCHS), help="preset, or all of them")
    ap.add_argument("--size", default="1b", choices=SIZES, help="preset size")
    ap.add_argument("--ratio", help="hybrids: attention:Mamba blocks, e.g. 1:3 (preset's when omitted)")
    ap.add_argument("--placement", help="hybrids: front/middle/end (inter), scatter/cluster/sandwich (intra)")
    ap.add_argument("--seq-len", type=int, default=8192, help="sequence length of the FLOPs and cache figures")
    ap.add_argument("--json", action="store_true", help="one JSON object (a list for --arch all)")
    args = ap.parse_args(argv)
    if args.seq_len < 1:
        ap.error(f"--seq-len {args.seq_len}: the FLOPs and cache figures need a length >= 1")
    archs = ARCHS if args.arch == "all" else (args.arch,)
    rows, unfit = [], []  # with --arch all, a --ratio / --placement applies to the archs that take it
    for a in archs:
        try:
            cfg = model_config(a, args.size, ratio=args.ratio, placement=args.placement)
        except ValueError as e:
            unfit.append((a, str(e)))
            continue
        rows.append({"arch": a, "size": args.size, **report(cfg, args.seq_len)})
    if not rows:
        ap.error(unfit[0][1])
    if unfit:  # on stderr: --json keeps stdout one JSON document
        print(f"left out (they do not take --ratio/--placement as given): {', '.join(a for a, _ in unfit)}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(rows if args.arch == "all" else rows[0], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"size {args.size}, sequence {args.seq_len}")
    for col in ("arch", "pattern", "non-emb params", "emb params", "active", "FLOPs/token",
                "non-emb FLOPs/token", "cache (MiB, bf16)"):
        table.add_column(col, justify="left" if col in ("arch", "pattern") else "right")
    for r in rows:
        mib = r["cache_bytes"] / 2**20
        table.add_row(r["arch"], r["pattern"], *(params(r[k]) for k in ("non_embedding_params", "embedding_params",
                                                                        "active_non_embedding_params")),
                      f"{r['flops_per_token']:.3e}", f"{r['non_embedding_flops_per_token']:.3e}",
                      f"{mib:.1f}" if mib >= 1 else f"{mib:.3g}")
    Console(width=160).print(table)


def params(n: int) -> str:
    """A parameter count in B (the paper's unit) down to 0.1B, in M or K below (the tiny sizes)."""
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


if __name__ == "__main__":
    main()
