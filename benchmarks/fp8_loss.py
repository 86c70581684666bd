"""FP8 against bf16 over a real run: the trainer twice on the demo corpus, same seed and data,
`train.fp8` none then the given recipe; prints both final losses and their relative gap (the
issue's bar: within 1% after 300 steps). GPU with sm >= 8.9 only.

    python benchmarks/fp8_loss.py --out runs/fp8_loss [--steps 300] [--recipe tensorwise] [--arch llama --size 100m]
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def last_losses(run_dir: Path, n: int) -> float:
    """Mean train loss of the last `n` logged steps (one step's loss is noisy)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [math.nan if r["train/loss"] is None else r["train/loss"] for r in rows if "train/loss" in r][-n:]
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="prepared corpus (default: build the demo corpus under --out)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--recipe", default="tensorwise", choices=("tensorwise", "rowwise"))
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--size", default="100m")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    data = args.data or args.out / "data"
    if not (data / "manifest.json").exists() and args.data is None:
        subprocess.run([sys.executable, "-m", "data_pipeline.demo_corpus", "--out", str(data), "--workers", "8"],
                       check=True, cwd=ROOT)
    result = {}
    for fp8 in ("none", args.recipe):
        run = args.out / f"fp8_{fp8}"
        subprocess.run([sys.executable, str(ROOT / "pretrain/main.py"), "--arch", args.arch, "--size", args.size,
                        "--data", str(data), "--run-dir", str(run), "--train.device=cuda", f"--train.fp8={fp8}",
                        f"--train.steps={args.steps}", "--data.seq_len=1024", "--train.micro_batch_size=16",
                        "--train.val_every=0", "--checkpoint.enabled=false", "--logging.log_every=10",
                        f"--train.compile={str(args.compile).lower()}"], check=True, cwd=ROOT)
        result[fp8] = last_losses(run, 3)
    gap = (result[args.recipe] - result["none"]) / result["none"]
    result["relative_gap"] = gap
    (args.out / "fp8_loss.json").write_text(json.dumps(result, indent=2))
    print(f"{args.arch} {args.size}, {args.steps} steps: bf16 loss {result['none']:.4f}, fp8 {args.recipe} "
          f"{result[args.recipe]:.4f}, gap {gap:+.2%} (mean of the last 3 logged steps)")


if __name__ == "__main__":
    main()
