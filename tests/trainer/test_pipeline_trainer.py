"""The trainer under pipeline parallelism (gloo, torchrun): pp=2 (1F1B over the pattern's marked
stages, 2 microbatches, 2 accumulation steps, activation checkpointing) follows the single-process training and validation
losses, and its checkpoint (each stage's parameters under their global names) resumes on one
process with the same next-step losses (DCP reshards the layout). pp=2 x ep=2 (4 processes) does
too, and its checkpoint resumes on one process and at tp=2 with the same next-step losses (the
loader resuming at the same position). The MoE load metrics cover every
stage's layers (gathered over the pipeline ranks) and equal the single process's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import curves
from trainer_helpers import run_to_end, tiny_args

STEPS = 4
pytestmark = pytest.mark.slow


def args(run_dir: Path, corpus: Path, *extra: str) -> list[str]:
    return tiny_args(run_dir, corpus, STEPS, "--train.micro_batch_size=2", "--train.global_batch_tokens=128",
                     "--train.val_every=2", "--train.val_batches=2", "--model.overrides.tie_embeddings=false",
                     "--model.overrides.pattern=MA|MM", "--optim.grad_clip=0.05", *extra)


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single")
    run_to_end(args(run_dir, corpus))
    return run_dir


def test_pp2_matches_one_process_and_resumes_on_one(corpus, single, tmp_path):
    pp2, resumed = tmp_path / "pp2", tmp_path / "resumed"
    out = run_to_end(args(pp2, corpus, "--parallel.pp=2", "--parallel.pp_microbatches=2",
                          "--train.activation_checkpointing=true"), nproc=2)
    assert "pp=2 grad_accum=2" in out and "pipeline: 2 stages ((0, 2), (2, 4)), 1f1b, 2 microbatches" in out
    curves.assert_close_curves(pp2, single, range(1, STEPS + 1), validation=True)
    loads = [moe_loads(run) for run in (pp2, single)]
    assert len(loads[0]) == 4 and loads[0] == pytest.approx(loads[1], rel=1e-5)  # one per block, both stages
    run_to_end(args(resumed, corpus, f"--resume-from={pp2 / 'checkpoints/step_00000002'}"))
    curves.assert_close_curves(resumed, single, range(3, STEPS + 1))


def moe_loads(run_dir: Path) -> dict[str, float]:
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in line][-1]
    return {k: v for k, v in last.items() if k.startswith("moe/max_over_mean_load/")}


def test_pp2_ep2_matches_one_process_and_resumes_on_one_and_at_tp2(corpus, single, tmp_path):
    ppep = tmp_path / "pp2ep2"
    out = run_to_end(args(ppep, corpus, "--parallel.pp=2", "--parallel.ep=2", "--parallel.pp_microbatches=2",
                          "--train.val_batches=1"), nproc=4)  # dp=2: the single run's validation windows
    assert "ep=2 pp=2" in out
    curves.assert_close_curves(ppep, single, range(1, STEPS + 1), validation=True)
    for name, nproc, extra in (("one", 1, ()), ("tp2", 2, ("--parallel.tp=2",))):
        run_to_end(args(tmp_path / name, corpus, *extra, f"--resume-from={ppep / 'checkpoints/step_00000002'}"),
                   nproc=nproc)
        curves.assert_close_curves(tmp_path / name, single, range(3, STEPS + 1), validation=True)


def test_pp2_with_document_masking_and_aux_loss_matches_one_process(corpus, tmp_path):
    """The trainer's packed documents reach every stage and each stage's MoE balance loss joins
    the loss: the single process runs one row per micro-batch, as each pipeline microbatch is. The
    bias updates agree only if torch's first-step metadata forward is not counted in the loads."""
    extra = ("--data.document_masking=true", "--model.overrides.moe.aux_loss_coef=0.01")
    run_to_end(args(tmp_path / "single", corpus, *extra, "--train.micro_batch_size=1", "--train.val_batches=4"))
    run_to_end(args(tmp_path / "pp2", corpus, *extra, "--parallel.pp=2", "--parallel.pp_microbatches=2"), nproc=2)
    curves.assert_close_curves(tmp_path / "pp2", tmp_path / "single", range(1, STEPS + 1), validation=True)
