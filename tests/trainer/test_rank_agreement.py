"""What every rank must agree on, with 2 gloo processes: the checkpoint to resume from (rank 0's
choice, even when the ranks' views of the run directory differ), a layout one rank refuses (every
rank stops with its message), and the MoE expert bias (updated from the expert loads summed over
the data-parallel ranks)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from parallel.distributed import destroy_distributed
from pretrain.checkpoint import checkpoint_name
from pretrain.config import ConfigError
from pretrain.rank_agreement import agreed_config_errors
from free_port import free_port
from pretrain.resume_choice import choose_resume_checkpoint
from pretrain.trainer import Trainer
from trainer_helpers import seal, tiny_config

pytestmark = pytest.mark.slow
WORLD = 2


def make_checkpoints(ckpt_dir: Path, steps: list[int]) -> None:
    """Committed (complete) checkpoint directories holding one small file each."""
    for step in steps:
        path = ckpt_dir / checkpoint_name(step)
        path.mkdir(parents=True)
        (path / "train_state.json").write_bytes(b"x" * step)
        seal(path)


def worker(rank: int, port: int, corpus: str, root: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    root_dir, result = Path(root), {}
    try:
        # Each rank looks at its own copy of the run directory: rank 0 sees step 4, rank 1 only step 2.
        view = root_dir / f"view{rank}"
        result["resume"] = str(choose_resume_checkpoint(view, ""))
        bad = str(root_dir / "missing") if rank == 0 else str(view / checkpoint_name(2))
        try:
            choose_resume_checkpoint(view, bad)
            result["bad_resume_from"] = "accepted"
        except ConfigError as e:
            result["bad_resume_from"] = str(e)
        try:  # a pipeline stage only rank 1 builds cannot be split
            with agreed_config_errors():
                if rank == 1:
                    raise ValueError("parallel.tp=2 must divide the FFN width 201")
            result["one_rank_refuses"] = "accepted"
        except ConfigError as e:
            result["one_rank_refuses"] = str(e)
        try:  # any other failure: re-raised where it happened, named on the others (none waits for it)
            with agreed_config_errors():
                if rank == 1:
                    raise RuntimeError("DTensor says no")
        except RuntimeError as e:
            result["one_rank_crashes"] = str(e)
        result["save_one_rank_cannot_write"] = save_where_one_rank_cannot_write(root_dir / "ckpt", rank)
        # 2 data-parallel ranks, 2 rows each, different rows: their local expert loads differ.
        result["expert_bias"] = train_expert_bias(root_dir / "run", Path(corpus))
    finally:
        (root_dir / f"rank{rank}.json").write_text(json.dumps(result))
        destroy_distributed()


def save_where_one_rank_cannot_write(ckpt_dir: Path, rank: int) -> str:
    """Rank 1's shard (2 MB) does not fit its file-size limit, as on a full disk: both ranks stop with
    the OSError (DCP pickles rank 1's failure to rank 0, which drops its chain) and no partial save."""
    import resource
    import signal

    from pretrain.checkpoint import CheckpointManager, CheckpointSaveFailed

    manager = CheckpointManager(ckpt_dir, keep=2, async_save=False, is_main=rank == 0)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    try:
        manager.save(2, {"model": {f"w{rank}": torch.ones(1 << 19)}}, {"rank": rank}, {}, {})
        return "saved"
    except CheckpointSaveFailed as e:
        return f"{e} | left: {sorted(p.name for p in ckpt_dir.iterdir())}"
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)


def train_expert_bias(run_dir: Path, corpus: Path) -> list[list[float]]:
    trainer = Trainer(tiny_config(run_dir, corpus, 3, "--train.micro_batch_size=2", "--checkpoint.enabled=false"))
    trainer.train()
    return [m.expert_bias.tolist() for m in trainer.moe_layers]


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory) -> tuple[list[dict], Path]:
    root = tmp_path_factory.mktemp("agreement")
    make_checkpoints(root / "view0", [2, 4])
    make_checkpoints(root / "view1", [2])
    port = free_port()
    mp.spawn(worker, args=(port, str(corpus), str(root)), nprocs=WORLD, join=True)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(WORLD)], root


def test_rank0_chooses_the_checkpoint_every_rank_resumes_from(results):
    ranks, root = results
    assert [r["resume"] for r in ranks] == [str(root / "view0" / checkpoint_name(4))] * WORLD
    for r in ranks:  # rank 0 found resume_from incomplete: every rank stops with its message
        assert "checkpoint.resume_from" in r["bad_resume_from"] and "missing" in r["bad_resume_from"]


def test_moe_expert_bias_is_identical_on_every_data_parallel_rank(results):
    ranks, _ = results
    biases = [r["expert_bias"] for r in ranks]
    assert biases[0] and any(any(b != 0 for b in layer) for layer in biases[0])  # the bias was updated
    assert biases[0] == biases[1]


def test_a_layout_one_rank_refuses_stops_every_rank_with_its_message(results):
    ranks, _ = results
    assert [r["one_rank_refuses"] for r in ranks] == ["config: parallel.tp=2 must divide the FFN width 201"] * WORLD
    assert [r["one_rank_crashes"] for r in ranks] == [
        "rank 1 failed while setting up the layout (RuntimeError: DTensor says no)", "DTensor says no"]


def test_a_save_one_rank_cannot_write_stops_every_rank_in_one_line(results):
    ranks, root = results
    for r in ranks:
        said = r["save_one_rank_cannot_write"]
        assert said.startswith(f"checkpoint {root / 'ckpt' / checkpoint_name(2)} could not be saved (OSError: "
                               "[Errno 27] File too large") and said.endswith("| left: []"), said
