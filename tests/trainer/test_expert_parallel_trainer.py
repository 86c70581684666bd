"""The trainer under expert parallelism (gloo, torchrun): an ep=2 run follows the single-process
training and validation losses, and its checkpoint (experts sharded over the ep ranks) resumes on
one process and at tp=2 with the same next-step losses (DCP reshards the experts)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import curves
from test_model_parallel_trainer import args
from trainer_helpers import run_to_end

STEPS = 4
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    single, ep2 = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ep2")
    run_to_end(args(single, corpus, 1))
    assert "dp=2 tp=1 cp=1 ep=2" in run_to_end(args(ep2, corpus, 2, "--parallel.ep=2"), nproc=2)
    return single, ep2


def test_ep2_matches_single_process_and_reports_rank_load(runs):
    single, ep2 = runs
    curves.assert_close_curves(ep2, single, range(1, STEPS + 1), validation=True)
    records = [json.loads(line) for line in (ep2 / "metrics.jsonl").read_text().splitlines()]
    rows = [r["moe/ep_rank_rows_max"] for r in records if "moe/ep_rank_rows_max" in r]
    # 2 rows x 32 tokens per rank, top-1: a rank computes between half and all of the 128 rows
    assert len(rows) == STEPS and all(64 <= r <= 128 for r in rows), rows


@pytest.mark.parametrize("extra, nproc", [((), 1), (("--parallel.tp=2",), 2)], ids=["one_process", "tp2"])
def test_ep2_checkpoint_resumes(corpus, runs, extra, nproc, tmp_path):
    single, ep2 = runs
    run_to_end(args(tmp_path, corpus, 1, *extra, f"--resume-from={ep2 / 'checkpoints/step_00000002'}"), nproc=nproc)
    curves.assert_close_curves(tmp_path, single, range(3, STEPS + 1), validation=True)
