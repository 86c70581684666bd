"""Helpers for the evaluation tests: tiny runs trained by `pretrain/main.py` (a module of its own, as
`conftest` names collide across test directories)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRAIN_SEQ_LEN = 64
VAL_BATCHES = 3
MICRO_BATCH = 4


def train_tiny(run_dir: Path, corpus: Path, arch: str, steps: int = 30, nproc: int = 1) -> Path:
    """A finished tiny fp32 CPU run; with nproc > 1, data-parallel (FSDP) under torchrun with gloo."""
    args = ["--arch", arch, "--size", "tiny", "--data", str(corpus), "--run-dir", str(run_dir),
            f"--data.seq_len={TRAIN_SEQ_LEN}", f"--train.micro_batch_size={MICRO_BATCH}", f"--train.steps={steps}",
            "--train.device=cpu", "--train.dtype=fp32", "--optim.lr=3e-3", "--logging.tensorboard=false",
            f"--train.val_every={steps}", f"--train.val_batches={VAL_BATCHES}", f"--checkpoint.every={steps}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run([sys.executable, *launcher, str(REPO / "pretrain" / "main.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir
