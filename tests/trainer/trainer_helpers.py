"""Helpers for trainer tests: tiny runs in-process or as (torchrun) subprocesses, readers, and
sealing hand-made checkpoint directories."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
MAIN = REPO / "pretrain" / "main.py"


def tiny_args(run_dir: Path, corpus: Path, steps: int, *extra: str) -> list[str]:
    """CLI arguments of a tiny deterministic fp32 CPU run (every step logged)."""
    return ["--arch", "hybrid_moe", "--size", "tiny", "--data", str(corpus), "--run-dir", str(run_dir),
            "--data.seq_len=32", "--train.micro_batch_size=4", f"--train.steps={steps}", "--train.device=cpu",
            "--train.dtype=fp32", "--optim.lr=3e-3", "--logging.log_every=1", "--logging.tensorboard=false",
            "--data.num_streams=8", "--train.val_every=0", "--checkpoint.every=2", "--checkpoint.keep=10", *extra]


def tiny_config(run_dir: Path, corpus: Path, steps: int, *extra: str):
    from pretrain.config import parse_args

    cfg, _ = parse_args(tiny_args(run_dir, corpus, steps, *extra))
    return cfg


def launch(args: list[str], nproc: int = 1, env: dict[str, str] | None = None, **popen_kw) -> subprocess.Popen:
    """Start pretrain/main.py as a script (1 process) or under torchrun (gloo, nproc processes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    if nproc == 1:
        cmd = [sys.executable, str(MAIN), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               str(MAIN), *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen_kw)


def run_to_end(args: list[str], nproc: int = 1, expect_rc: int = 0) -> str:
    proc = launch(args, nproc)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect_rc, out[-4000:]
    return out


def losses(run_dir: Path, file: str = "metrics.jsonl") -> dict[int, list[float]]:
    """step -> every training loss logged for it in `file` (metrics.jsonl keeps one a step: rows a
    resumed run redoes move to metrics.superseded.jsonl). A line cut by SIGKILL mid-write is ignored."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / file).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "train/loss" in rec:
            out.setdefault(rec["step"], []).append(rec["train/loss"])
    return out


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    from pretrain.hf import load_model

    return load_model(checkpoint).state_dict()


def seal(path: Path) -> None:
    """Commit the directory written at `path` as a complete checkpoint, the way a save ends
    (`pretrain.checkpoint.commit` from its `.tmp-` name): listing and loading accept only sealed ones."""
    from pretrain.checkpoint import commit

    tmp = path.with_name(f".tmp-{path.name}")
    path.rename(tmp)
    commit(tmp, path)


def signal_during_step(trainer, step: int) -> None:
    """Make `trainer` record SIGTERM while it runs step `step` (1-based), as a signal handler would."""
    import signal

    train_step = trainer.train_step

    def step_with_signal():
        if trainer.progress.step == step - 1:
            trainer.preemption.signum = signal.SIGTERM
        return train_step()

    trainer.train_step = step_with_signal
