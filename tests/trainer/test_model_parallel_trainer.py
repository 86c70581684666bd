"""The trainer under tensor and context parallelism (gloo, torchrun): tp=2, tp=2 x fsdp=2, cp=2 and
tp=2 x cp=2 (with activation checkpointing) runs follow the single-process training and validation
losses, and a checkpoint saved at tp=2 x fsdp=2 resumes on one process and at cp=2 with the same
next-step losses (DCP reshards the layout)."""
from __future__ import annotations

from pathlib import Path

import pytest

import curves
from trainer_helpers import run_to_end, tiny_args

STEPS = 4
pytestmark = pytest.mark.slow
GLOBAL_ROWS = 4


def args(run_dir: Path, corpus: Path, dp: int, *extra: str) -> list[str]:
    # The same global batch every way; the tiny intra-hybrid gets 2 K/V heads and 4 SSM heads so
    # that tp x cp can split them.
    return tiny_args(run_dir, corpus, STEPS, f"--train.micro_batch_size={GLOBAL_ROWS // dp}",
                     "--train.val_every=2", "--train.val_batches=2",
                     "--model.overrides.intra.kv_heads=2", "--model.overrides.intra.attn_heads=4",
                     "--model.overrides.intra.ssm_heads=4", *extra)


def assert_close_curves(run_dir: Path, reference: Path, steps: range) -> None:
    curves.assert_close_curves(run_dir, reference, steps, validation=True)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_to_end(args(run_dir, corpus, 1))
    return run_dir


@pytest.fixture(scope="module")
def tp2_fsdp2(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("tp2_fsdp2")
    out = run_to_end(args(run_dir, corpus, 2, "--parallel.tp=2"), nproc=4)
    assert "dp=2 tp=2 cp=1" in out
    return run_dir


def test_tp2_matches_single_process(corpus, single, tmp_path):
    assert "dp=1 tp=2 cp=1" in run_to_end(args(tmp_path, corpus, 1, "--parallel.tp=2"), nproc=2)
    assert_close_curves(tmp_path, single, range(1, STEPS + 1))


def test_tp2_fsdp2_matches_single_process(single, tp2_fsdp2):
    assert_close_curves(tp2_fsdp2, single, range(1, STEPS + 1))


def test_tp2_fsdp2_checkpoint_resumes_on_one_process(corpus, single, tp2_fsdp2, tmp_path):
    run_to_end(args(tmp_path, corpus, 1, f"--resume-from={tp2_fsdp2 / 'checkpoints/step_00000002'}"))
    assert_close_curves(tmp_path, single, range(3, STEPS + 1))


def test_cp2_matches_single_process(corpus, single, tmp_path):
    assert "dp=1 tp=1 cp=2" in run_to_end(args(tmp_path, corpus, 1, "--parallel.cp=2"), nproc=2)
    assert_close_curves(tmp_path, single, range(1, STEPS + 1))


def test_tp2_cp2_with_activation_checkpointing_matches_single_process(corpus, single, tmp_path):
    out = run_to_end(args(tmp_path, corpus, 1, "--parallel.tp=2", "--parallel.cp=2",
                          "--train.activation_checkpointing=true"), nproc=4)
    assert "dp=1 tp=2 cp=2" in out
    assert_close_curves(tmp_path, single, range(1, STEPS + 1))


def test_tp2_fsdp2_checkpoint_resumes_at_cp2(corpus, single, tp2_fsdp2, tmp_path):
    run_to_end(args(tmp_path, corpus, 1, "--parallel.cp=2", f"--resume-from={tp2_fsdp2 / 'checkpoints/step_00000002'}"),
               nproc=2)
    assert_close_curves(tmp_path, single, range(3, STEPS + 1))
