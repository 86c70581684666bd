"""A one-process bf16 run trains on persistent bf16 working copies (parallel/mixed_precision): it
must resume bit for bit from a checkpoint (the copies are rebuilt from the loaded masters), clip
through the optimizer, and accumulate micro-batches."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer_helpers import losses, run_to_end, tiny_args, weights

STEPS = 6
pytestmark = pytest.mark.slow


def bf16_args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    # grad_clip low enough that every step clips: the scale travels through the optimizer
    return tiny_args(run_dir, corpus, STEPS, "--train.dtype=bf16", "--optim.grad_clip=0.05",
                     "--checkpoint.every=3", *extra)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("bf16")
    run_to_end(bf16_args(run_dir, corpus))
    return run_dir


def test_bf16_run_resumes_bitwise(corpus, reference, tmp_path):
    run_to_end(bf16_args(tmp_path, corpus, f"--resume-from={reference / 'checkpoints/step_00000003'}"))
    ref, got = losses(reference), losses(tmp_path)
    assert sorted(got) == [4, 5, 6] and all(got[s] == ref[s] for s in got)
    final = f"checkpoints/step_{STEPS:08d}"
    a, b = weights(reference / final), weights(tmp_path / final)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bf16_run_learns_and_clips(reference):
    import json

    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    norms = [r["train/grad_norm"] for r in records if "train/grad_norm" in r]
    assert len(norms) == STEPS and min(norms) > 0.05  # every step clipped
    curve = losses(reference)
    assert curve[STEPS][0] < curve[1][0]


def test_bf16_run_accumulates_micro_batches(corpus, tmp_path):
    # 2 rows per micro-batch, 4 per step: two micro-batches folded into fp32 on the masters
    run_to_end(bf16_args(tmp_path, corpus, "--train.micro_batch_size=2", "--train.global_batch_tokens=128",
                         "--checkpoint.every=0"))
    curve = losses(tmp_path)
    assert sorted(curve) == list(range(1, STEPS + 1)) and all(math.isfinite(v[0]) for v in curve.values())
    assert curve[STEPS][0] < curve[1][0]
