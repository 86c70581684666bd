"""`make demo`: the whole stack end to end on CPU in a few minutes.

Builds the embedded demo corpus (Python standard-library sources, BPE 8K), trains a tiny
`hybrid_moe` for a few hundred steps, prints the validation NLL before and after, and samples a
short continuation. Checkpoints, TensorBoard logs and summary.json land in --run-dir.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from pretrain.config import (CheckpointSection, ConfigError, DataSection, JobConfig, LoggingSection, ModelSection,
                             OptimSection, ScheduleSection, TrainSection, parse_source)
from pretrain.metrics import setup_logging
from pretrain.resume_settings import read_saved_settings
from pretrain.trainer import Trainer

PROMPT = "def "
RUN_FILES = ("checkpoints", "tensorboard", "metrics.jsonl", "summary.json")
DEMO_MARKER = ".demo-run"  # written by the demo into its run directory


def made_by_demo(run_dir: Path) -> bool:
    """Whether `run_dir` is a demo's: it holds the demo's marker, or (a demo of an older version)
    every checkpoint in it trained on the demo corpus in RUN_DIR/data alone."""
    if (run_dir / DEMO_MARKER).exists():
        return True

    def sources(checkpoint: Path) -> list[Path]:
        try:
            listed = read_saved_settings(checkpoint)["data"]["sources"]
        except ConfigError:  # not readable as a checkpoint of this stack
            return []
        return [Path(parse_source(source)[0]).resolve() for source in listed]

    checkpoints = list(run_dir.glob("checkpoints/step_*"))
    return bool(checkpoints) and all(sources(c) == [(run_dir / "data").resolve()] for c in checkpoints)


def demo_config(run_dir: Path, data_dir: Path, steps: int) -> JobConfig:
    return JobConfig(
        run_dir=str(run_dir),
        model=ModelSection(arch="hybrid_moe", size="tiny"),
        data=DataSection(sources=[str(data_dir)], seq_len=128),
        optim=OptimSection(lr=3e-3, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleSection(kind="trapezoid", warmup_frac=0.1, cooldown_frac=0.2),
        train=TrainSection(steps=steps, micro_batch_size=16, device="cpu", dtype="fp32",
                           val_every=max(steps // 3, 1), val_batches=8, seed=0),
        checkpoint=CheckpointSection(every=max(steps // 3, 1), keep=2),
        logging=LoggingSection(log_every=25),
    )


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation NLL) pairs from metrics.jsonl."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "val/nll" in rec:
            out.append((rec["step"], math.nan if rec["val/nll"] is None else rec["val/nll"]))  # null: not finite
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300, ~2 minutes on 2 cores)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be at least 1 (got {args.steps})")
    t0 = time.perf_counter()
    run_dir: Path = args.run_dir
    # A demo always starts from scratch (the prepared corpus is reused between runs), so it clears
    # only a demo's run directory.
    previous = [name for name in RUN_FILES if (run_dir / name).exists()]
    if previous and not made_by_demo(run_dir):
        p.error(f"--run-dir {run_dir} holds a training run that is not a demo's ({', '.join(previous)}), which the "
                "demo would delete: pick another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARKER).touch()
    for stale in RUN_FILES:
        target = run_dir / stale
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    setup_logging(run_dir, rank=0)

    from data_pipeline.demo_corpus import build_demo_corpus
    from data_pipeline.tokenizer import load_tokenizer

    print(f"[demo] building the demo corpus in {run_dir / 'data'} ...", flush=True)
    data_dir = build_demo_corpus(run_dir / "data")
    print(f"[demo] corpus ready ({time.perf_counter() - t0:.0f}s); training tiny hybrid_moe for {args.steps} steps",
          flush=True)
    trainer = Trainer(demo_config(run_dir, data_dir, args.steps))
    summary = trainer.train()

    tok = load_tokenizer(data_dir)
    prompt = torch.tensor([[tok.bos_id, *tok.encode(PROMPT)]])
    trainer.model.eval()
    out = trainer.model.generate(prompt, max_new_tokens=48, temperature=0.8, top_k=40,
                                 generator=torch.Generator().manual_seed(0), eos_id=tok.eos_id)
    ids = out[0, 1:].tolist()
    sample = tok.decode(ids[:ids.index(tok.eos_id)] if tok.eos_id in ids else ids)  # the text up to the document's end

    curve = val_curve(run_dir)
    (start_step, start), (end_step, end) = curve[0], curve[-1]
    print("\n[demo] ---------------------------------------------------------------")
    print(f"[demo] validation NLL at step {start_step}: {start:.3f} nats/token")
    print(f"[demo] validation NLL at step {end_step}: {end:.3f} nats/token  ({start - end:.3f} lower)")
    print(f"[demo] sample (temperature 0.8): {sample!r}")
    print(f"[demo] run directory {run_dir}: checkpoints/, tensorboard/, metrics.jsonl, summary.json")
    print(f"[demo] view curves: tensorboard --logdir {run_dir / 'tensorboard'}")
    print(f"[demo] total {time.perf_counter() - t0:.0f}s, {summary['tokens_seen']:,} tokens trained")
    if not end < start:
        print("[demo] FAILED: validation NLL did not go down", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
