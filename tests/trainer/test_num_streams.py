"""data.num_streams = 0 (the default) is the run's own: lcm(64, dp size) for a fresh run, the
checkpoint's count on resume; a count the data-parallel size does not divide fails at start."""
from __future__ import annotations

import pytest

from pretrain.config import ConfigError
from pretrain.resume_settings import read_saved_settings
from pretrain.job import resolve_num_streams
from pretrain.trainer import Trainer
from trainer_helpers import losses, tiny_config


@pytest.mark.parametrize("dp_size,expected", [(1, 64), (8, 64), (128, 128), (24, 192)])
def test_fresh_run_takes_a_multiple_of_64_the_ranks_divide(dp_size, expected):
    assert resolve_num_streams(0, dp_size, None) == expected


def test_configured_count_must_be_divisible_by_the_ranks():
    assert resolve_num_streams(32, 16, None) == 32
    with pytest.raises(ConfigError, match=r"data.num_streams=64 is not divisible by the 128 data-parallel ranks"):
        resolve_num_streams(64, 128, None)


def test_resume_keeps_the_checkpoints_count(tmp_path):
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match=r"cannot read the settings of .*step_00000002 \(FileNotFoundError.*config.toml"):
        read_saved_settings(ckpt)
    (ckpt / "config.toml").write_text("[data]\nnum_streams = 8\n")
    with pytest.raises(ConfigError, match=r"cannot read the settings of .*step_00000002 \(FileNotFoundError.*train_state"):
        read_saved_settings(ckpt)
    (ckpt / "train_state.json").write_text('{"dp_size": 2, "ranks": []}')
    saved = read_saved_settings(ckpt)["data"]["num_streams"]
    assert saved == 8 and resolve_num_streams(0, 2, saved) == 8 and resolve_num_streams(8, 2, saved) == 8
    with pytest.raises(ConfigError, match=r"num_streams=8\) is not divisible by the 3 data-parallel ranks"):
        resolve_num_streams(0, 3, saved)
    with pytest.raises(ConfigError, match=r"data.num_streams=16 but the checkpoint's data order has 8"):
        resolve_num_streams(16, 2, saved)


def test_resumed_run_with_the_default_continues_the_data_order(corpus, tmp_path):
    """Started with 8 streams, resumed with the default: the run keeps 8 and its loss curve."""
    Trainer(tiny_config(tmp_path / "straight", corpus, 4)).train()  # tiny runs set 8 streams
    step2 = tmp_path / "straight" / "checkpoints" / "step_00000002"
    resumed = Trainer(tiny_config(tmp_path / "resumed", corpus, 4, "--data.num_streams=0",
                                  f"--checkpoint.resume_from={step2}"))
    assert resumed.cfg.data.num_streams == 8
    resumed.train()
    straight, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(got) == [3, 4] and all(got[s] == straight[s] for s in got)
