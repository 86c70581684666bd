"""Launcher environments: srun's task variables become the torchrun names torch.distributed reads."""
import os

import pytest

from parallel.distributed import _env_from_slurm, init_distributed


@pytest.fixture(autouse=True)
def private_environ(monkeypatch):
    """_env_from_slurm writes os.environ; keep those writes inside the test."""
    monkeypatch.setattr(os, "environ", dict(os.environ))


def test_slurm_tasks_map_to_torchrun_variables():
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(name, None)
    os.environ.update(SLURM_PROCID="5", SLURM_LOCALID="1", SLURM_NTASKS="16", MASTER_ADDR="node001")
    _env_from_slurm()
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["WORLD_SIZE"]) == ("5", "1", "16")
    assert os.environ["MASTER_ADDR"] == "node001" and os.environ["MASTER_PORT"] == "29500"


def test_torchrun_variables_win_and_single_process_needs_no_group():
    os.environ.update(RANK="0", WORLD_SIZE="1", SLURM_PROCID="3", SLURM_NTASKS="8")
    _env_from_slurm()
    info = init_distributed("cpu")
    assert info.rank == 0 and info.world_size == 1 and info.is_main and str(info.device) == "cpu"
