"""The trainer under expert parallelism (2 gloo processes): an ep=2 run follows the single-process
training and validation losses with the aux-loss-free bias identical on both ranks, and its
checkpoint (experts sharded over the ep ranks) resumes on one process and at tp=2 (torchrun) with
the same next-step losses (DCP reshards the experts; the loader resumes at the same position)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import curves
from parallel.distributed import destroy_distributed
from pretrain.config import parse_args
from free_port import free_port
from pretrain.trainer import Trainer
from test_model_parallel_trainer import args
from trainer_helpers import run_to_end

STEPS = 4
pytestmark = pytest.mark.slow


def worker(rank: int, port: int, argv: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        trainer = Trainer(parse_args(argv)[0])
        trainer.train()
        bias = [m.expert_bias.tolist() for m in trainer.moe_layers]
        Path(out, f"bias{rank}.json").write_text(json.dumps({"bias": bias, "ep": trainer.dims.ep}))
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory) -> tuple[Path, Path]:
    single, ep2 = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("ep2")
    run_to_end(args(single, corpus, 1))
    port = free_port()
    mp.spawn(worker, args=(port, args(ep2, corpus, 2, "--parallel.ep=2"), str(ep2)), nprocs=2, join=True)
    return single, ep2


def test_ep2_keeps_the_bias_identical_on_every_rank(runs):
    _, ep2 = runs
    ranks = [json.loads((ep2 / f"bias{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["ep"] == 2 and any(any(b != 0 for b in layer) for layer in ranks[0]["bias"])  # updated
    assert ranks[0]["bias"] == ranks[1]["bias"]


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
