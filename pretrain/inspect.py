"""`python -m pretrain.inspect --arch A --size S [--seq-len 8192] [--json]`: parameters, FLOPs per
token and inference-cache size of presets, from the same config `build_model` uses."""

from __future__ import annotations

import argparse
import json

from pretrain.accounting import report
from pretrain.model.presets import ARCHS, SIZES, model_config


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pretrain.inspect", description=__doc__)
    ap.add_argument("--arch", default="all", choices=("all", *ARCHS))
    ap.add_argument("--size", default="1b", choices=SIZES)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--json", action="store_true", help="one JSON object (a list for --arch all)")
    args = ap.parse_args(argv)
    archs = ARCHS if args.arch == "all" else (args.arch,)
    rows = [{"arch": a, "size": args.size, **report(model_config(a, args.size), args.seq_len)} for a in archs]
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
        table.add_row(r["arch"], r["pattern"], f"{r['non_embedding_params'] / 1e9:.3f}B",
                      f"{r['embedding_params'] / 1e9:.3f}B", f"{r['active_non_embedding_params'] / 1e9:.3f}B",
                      f"{r['flops_per_token']:.3e}", f"{r['non_embedding_flops_per_token']:.3e}",
                      f"{r['cache_bytes'] / 2**20:.1f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
