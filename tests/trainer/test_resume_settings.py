"""Settings a resumed run may change: a global batch left to the layout (0) is the checkpoint's on
another layout, or refused where accumulation cannot make it up; every other change is warned."""
from __future__ import annotations

import dataclasses
import logging

import pytest

from pretrain.config import ConfigError, JobConfig, parse_args
from pretrain.resume_settings import changed_settings, keep_global_batch, read_saved_settings
from pretrain.trainer import Trainer
from trainer_helpers import losses, tiny_config


def settings(*argv: str, dp_size: int = 1) -> tuple[JobConfig, dict]:
    """A config from flags, and the same as a checkpoint of it saved on `dp_size` ranks reads."""
    cfg, _ = parse_args(["--data", "d", *argv])
    return cfg, {**dataclasses.asdict(cfg), "dp_size": dp_size, "path": "ckpt"}


def test_a_batch_left_to_the_layout_is_the_checkpoints_on_another_layout():
    _, saved = settings("--train.micro_batch_size=4", "--data.seq_len=32", dp_size=2)  # 256 tokens per step
    cfg, _ = settings("--train.micro_batch_size=4", "--data.seq_len=32")
    assert keep_global_batch(cfg, 1, saved).train.global_batch_tokens == 256  # 2 accumulation steps on 1 rank
    assert keep_global_batch(cfg, 2, saved) is cfg  # the same layout: nothing to keep
    with pytest.raises(ConfigError, match=r"checkpoint ckpt trained on 256 tokens per step, which 4 data-parallel "
                                          r"ranks x train.micro_batch_size 4 x data.seq_len 32 = 512 tokens per "
                                          r"micro-step cannot make up; keep it with train.global_batch_tokens=256"):
        keep_global_batch(cfg, 4, saved)
    explicit, _ = settings("--train.micro_batch_size=4", "--data.seq_len=32", "--train.global_batch_tokens=512")
    assert keep_global_batch(explicit, 1, saved) is explicit
    assert changed_settings(explicit, 1, saved)[0].startswith("tokens per step 256 -> 512 (train.global_batch_tokens)")


def test_schedule_length_sequence_and_validation_changes_are_each_named():
    _, saved = settings("--train.micro_batch_size=4", "--train.val_batches=4", "--train.global_batch_tokens=65536",
                        dp_size=2)
    cfg, _ = settings("--train.micro_batch_size=4", "--train.val_batches=4", "--train.global_batch_tokens=65536")
    assert changed_settings(cfg, 2, saved) == []
    cfg, _ = settings("--train.micro_batch_size=2", "--train.val_batches=4", "--train.global_batch_tokens=65536",
                      "--schedule.kind=cosine", "--train.steps=2000")
    changes = changed_settings(cfg, 2, saved)
    assert changes[:2] == ["train.steps 1000 -> 2000: the LR schedule follows the new length",
                           "schedule.kind 'trapezoid' -> 'cosine'"]
    assert changes[2].startswith("validation windows 32 -> 16 (") and changes[2].endswith(
        "val/nll is not comparable across this resume; train.val_batches=8 keeps them")
    assert len(changes) == 3


def test_read_saved_settings_fills_keys_an_older_checkpoint_lacks(tmp_path):
    (tmp_path / "config.toml").write_text("[train]\nsteps = 7\n")
    (tmp_path / "train_state.json").write_text('{"dp_size": 4, "ranks": []}')
    saved = read_saved_settings(tmp_path)
    assert saved["train"]["steps"] == 7 and saved["schedule"]["kind"] == "trapezoid" and saved["path"] == str(tmp_path)
    assert saved["dp_size"] == 4


def test_resumed_with_half_the_micro_batch_trains_the_same_batches(corpus, tmp_path, caplog):
    """global_batch_tokens=0 with micro-batch 4, resumed with 2: two accumulation steps make the
    checkpoint's batch up, and the losses continue the uninterrupted run's (to fp32 rounding)."""
    Trainer(tiny_config(tmp_path / "straight", corpus, 4, "--train.global_batch_tokens=0")).train()
    step2 = tmp_path / "straight" / "checkpoints" / "step_00000002"
    with caplog.at_level(logging.INFO):  # decided at start, before the checkpoint loads
        resumed = Trainer(tiny_config(tmp_path / "resumed", corpus, 4, "--train.global_batch_tokens=0",
                                      "--train.micro_batch_size=2", f"--checkpoint.resume_from={step2}"))
        resumed.train()
    assert resumed.grad_accum == 2 and resumed.tokens_per_step == 4 * 32
    assert "keeping the checkpoint's 128 tokens per step (train.global_batch_tokens=0 on another layout): 2 " \
           "accumulation steps" in caplog.text and "resumed with a changed setting" not in caplog.text
    straight, got = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(got) == [3, 4], got
    for step, [loss] in got.items():
        assert abs(loss - straight[step][0]) < 1e-5 * abs(loss), (got, straight)


def test_other_data_prepared_at_the_checkpoints_path_stops_the_resume(corpus, tmp_path):
    """The corpus prepared again from fewer files at the same path: the saved stream positions would
    point into other shards. Refused at start as a config error (exit 2), naming the source."""
    import shutil

    from data_pipeline.demo_corpus import stdlib_sources
    from data_pipeline.prepare import PrepareConfig, prepare

    data = shutil.copytree(corpus, tmp_path / "data")
    Trainer(tiny_config(tmp_path / "run", data, 2)).train()
    shutil.rmtree(data)
    prepare(PrepareConfig(inputs=[str(f) for f in stdlib_sources(200_000)], tokenizer="byte", out=data,
                          shard_tokens=1 << 13, val_fraction=0.3, workers=1, input_format="text", job_bytes=1 << 18,
                          progress=False))
    with pytest.raises(ConfigError, match=r"^config: .*manifest.json: data.sources\[0\]: the data differs from what "
                                          r"the checkpoint trained on .*fix: resume with the data the run trained on"):
        Trainer(tiny_config(tmp_path / "run", data, 4))  # at start, before the checkpoint's tensors load
