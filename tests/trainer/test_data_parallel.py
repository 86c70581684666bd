"""2-process gloo FSDP2 runs match the single-process run and reshard across process counts."""
from __future__ import annotations

from pathlib import Path

import pytest

from curves import assert_close_curves
from trainer_helpers import run_to_end, tiny_args

STEPS = 8
pytestmark = pytest.mark.slow


def args(run_dir: Path, corpus: Path, nproc: int, *extra: str) -> list[str]:
    # The same global batch (4 windows) either way: 1 rank x 4 rows or 2 ranks x 2 rows.
    return tiny_args(run_dir, corpus, STEPS, "--checkpoint.every=4", f"--train.micro_batch_size={4 // nproc}",
                     *extra)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_to_end(args(run_dir, corpus, 1))
    return run_dir


@pytest.fixture(scope="module")
def double(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("double")
    # Async saves here: ranks agree each step whether every rank's write has finished, then commit.
    run_to_end(args(run_dir, corpus, 2, "--checkpoint.async_save=true"), nproc=2)
    return run_dir


def test_two_process_fsdp_matches_single_process(single, double):
    assert_close_curves(double, single, range(1, STEPS + 1))


def test_resume_two_process_checkpoint_on_one_process(corpus, single, double, tmp_path):
    run_to_end(args(tmp_path, corpus, 1, f"--resume-from={double / 'checkpoints/step_00000004'}"))
    assert_close_curves(tmp_path, single, range(5, STEPS + 1))


def test_resume_one_process_checkpoint_on_two_processes(corpus, single, tmp_path):
    out = run_to_end(args(tmp_path, corpus, 2, f"--resume-from={single / 'checkpoints/step_00000004'}"), nproc=2)
    assert "saved by 1 rank(s), now 2" in out
    assert_close_curves(tmp_path, single, range(5, STEPS + 1))
