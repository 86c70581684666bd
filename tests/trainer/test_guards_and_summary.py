"""NaN/inf guard, summary.json, TensorBoard output, dry run and config errors at the entry point."""
from __future__ import annotations

import json
import math
import types
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pretrain.checkpoint import find_latest_complete, verify_checkpoint
from pretrain.main import main
from pretrain.preemption import Preempted
from pretrain.summary import read_summary
from pretrain.trainer import EXIT_STOPPED, Trainer, TrainingStopped
from trainer_helpers import losses, signal_during_step, tiny_config


def poison_loss(trainer: Trainer, bad_steps: set[int] | None = None, from_step: int | None = None) -> None:
    """Make model.loss return NaN (keeping the graph) on the given 1-based steps."""
    loss = trainer.model.loss

    def wrapped(tokens, targets):
        value = loss(tokens, targets)
        step = trainer.progress.step + 1
        if (bad_steps and step in bad_steps) or (from_step is not None and step >= from_step):
            return value * float("nan")
        return value

    trainer.model.loss = wrapped


def metric_rows(run_dir: Path) -> dict[int, dict]:
    """step -> its metrics.jsonl rows merged (validation logs a row of its own)."""
    rows: dict[int, dict] = {}
    for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()):
        rows[row["step"]] = {**rows.get(row["step"], {}), **row}
    return rows


def test_nan_steps_are_skipped_and_counted(corpus, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, corpus, 8, "--logging.tensorboard=true"))
    poison_loss(trainer, bad_steps={3, 6})
    assert trainer.moe_layers
    train_step, leftover_counts = trainer.train_step, {}

    def step_and_check_moe_counts():
        out = train_step()
        # Every step ends with zero routing counts: used by the bias update, or discarded when the
        # step was skipped (a bad step's routing must not steer the next update).
        leftover_counts[trainer.progress.step] = sum(int(m.tokens_per_expert.sum()) for m in trainer.moe_layers)
        return out

    trainer.train_step = step_and_check_moe_counts
    summary = trainer.train()
    assert leftover_counts == {step: 0 for step in range(1, 9)}
    assert summary["status"] == "finished" and summary["bad_steps"] == 2 and summary["step"] == 8
    assert math.isfinite(summary["last_train_loss"])
    assert all(math.isfinite(p.detach().sum().item()) for p in trainer.model.parameters())
    curve = losses(tmp_path)
    assert curve[3][0] is None and curve[6][0] is None and math.isfinite(curve[7][0])  # NaN as null: strict JSON
    rows = metric_rows(tmp_path)  # a skipped step has no routing load of its own to log
    assert [("moe/max_over_mean_load" in rows[s]) for s in (2, 3, 5, 6, 7)] == [True, False, True, False, True]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_repeated_nans_stop_naming_step_and_checkpoint(corpus, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, corpus, 12, "--train.max_bad_steps=3"))
    poison_loss(trainer, from_step=6)
    with pytest.raises(TrainingStopped) as err:
        trainer.train()
    message = str(err.value)
    assert "step 8" in message and str(tmp_path / "checkpoints" / "step_00000004") in message
    summary = read_summary(tmp_path)
    assert summary["status"] == "stopped" and summary["exit_code"] == EXIT_STOPPED
    assert summary["bad_steps"] == 3 and "step 8" in summary["error"]
    last = metric_rows(tmp_path)[8]  # the step that stops the run is logged, as summary.json counts it
    assert last["train/bad_steps"] == 3 and last["train/loss"] is None


def test_a_save_before_the_first_good_step_resumes_exactly(corpus, tmp_path):
    """Step 1 non-finite (skipped), then a preemption: the checkpoint holds an optimizer that has
    taken no step. Resumed, the run's losses equal an uninterrupted run's (torch's get_state_dict
    filled an optimizer without state by taking a step at lr 0, which counted: every later bias
    correction of the resumed run was one step off)."""
    straight = Trainer(tiny_config(tmp_path / "straight", corpus, 4))
    poison_loss(straight, bad_steps={1})
    straight.train()
    preempted = Trainer(tiny_config(tmp_path / "run", corpus, 4))
    poison_loss(preempted, bad_steps={1})
    signal_during_step(preempted, 1)
    with pytest.raises(Preempted):
        preempted.train()
    assert Trainer(tiny_config(tmp_path / "run", corpus, 4)).train()["status"] == "finished"
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "run")
    assert [b[s] for s in (2, 3, 4)] == [a[s] for s in (2, 3, 4)]


def test_summary_of_a_finished_run(corpus, tmp_path):
    trainer = Trainer(tiny_config(tmp_path, corpus, 4, "--train.val_every=2", "--train.val_batches=2"))
    trainer.train()
    s = read_summary(tmp_path)
    assert s["status"] == "finished" and s["step"] == 4 and s["tokens_seen"] == 4 * 4 * 32
    assert math.isfinite(s["last_train_loss"]) and math.isfinite(s["last_val_nll"])
    assert s["checkpoint"].endswith("step_00000004") and s["wall_time_s"] > 0
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    assert (ckpt / "config.toml").read_text().count("hybrid_moe") == 1


def test_dry_run_builds_on_meta_and_reports(capsys):
    assert main(["--dry-run", "--arch", "hybrid_moe", "--size", "1b", "--data.seq_len=8192",
                 "--train.micro_batch_size=2"]) == 0
    out = capsys.readouterr().out
    assert 'arch = "hybrid_moe"' in out and "parameters" in out and "FLOPs per token" in out
    assert "memory per GPU" in out and "GiB" in out
    assert "16,384 tokens per step (1 data-parallel ranks x micro-batch 2 x 1 accumulation" in out
    assert "data streams         64" in out


def test_dry_run_checks_the_layout_of_a_large_launch(capsys, monkeypatch):
    """At 128 ranks the run picks 128 streams; a global batch that 128 ranks cannot fill fails."""
    monkeypatch.setenv("WORLD_SIZE", "128")
    args = ["--dry-run", "--arch", "hybrid_moe", "--size", "tiny", "--data.seq_len=256"]
    assert main(args) == 0
    assert "data streams         128" in capsys.readouterr().out
    assert main([*args, "--train.global_batch_tokens=65536"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_tokens=65536 is not a multiple of 128 data-parallel ranks x" in err
    # every fix is proposed, and each one works: smaller micro-batches, a larger global batch, or none
    assert "lower train.micro_batch_size to 2 (1 accumulation step) or 1 (2 accumulation steps)" in err
    assert "a multiple of 262144 (e.g. 262144: 1 accumulation step)" in err and "set it to 0" in err
    for fix in ("--train.micro_batch_size=2", "--train.micro_batch_size=1", "--train.global_batch_tokens=262144",
                "--train.global_batch_tokens=0"):
        assert main([*args, "--train.global_batch_tokens=65536", fix]) == 0, fix
    assert main([*args, "--data.num_streams=64"]) == 2
    assert "data.num_streams=64 is not divisible by the 128 data-parallel ranks" in capsys.readouterr().err


def test_batch_fixes_under_a_pipeline_are_multiples_of_its_microbatches(capsys, monkeypatch):
    """Micro-batch 3 or 1 would fill 96 tokens, but pp=2 splits each micro-batch in 2: not proposed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["--dry-run", "--arch", "llama", "--size", "tiny", "--model.overrides.tie_embeddings=false",
            "--data.seq_len=32", "--parallel.pp=2", "--train.micro_batch_size=4"]
    assert main([*args, "--train.global_batch_tokens=96"]) == 2
    err = capsys.readouterr().err
    assert "lower train.micro_batch_size" not in err and "a multiple of 128" in err
    assert main([*args, "--train.global_batch_tokens=256", "--train.micro_batch_size=2"]) == 0


def test_bad_config_exits_2_naming_the_key(capsys):
    assert main(["--optim.lr=fast"]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["--data", "/nonexistent/dir", "--dry-run"]) == 2


def test_activation_checkpointing_same_curve_and_interchangeable_checkpoints(corpus, tmp_path):
    plain = Trainer(tiny_config(tmp_path / "plain", corpus, 3))
    plain.train()
    ac = Trainer(tiny_config(tmp_path / "ac", corpus, 3, "--train.activation_checkpointing=true"))
    ac.train()
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "ac")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(b[s][0] == pytest.approx(a[s][0], rel=1e-6) for s in a)
    resumed = Trainer(tiny_config(tmp_path / "x", corpus, 3, "--train.activation_checkpointing=true",
                                  f"--resume-from={tmp_path / 'plain/checkpoints/step_00000002'}"))
    assert resumed.resume() and resumed.progress.step == 2


def test_summary_is_strict_json(tmp_path):
    import json

    from pretrain.summary import write_summary

    write_summary(tmp_path, {"last_val_nll": float("nan"), "step": 3})
    text = (tmp_path / "summary.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}")) == \
        {"last_val_nll": None, "step": 3}


def test_a_summary_write_that_fails_leaves_no_temp_file(tmp_path, monkeypatch):
    import errno

    from pretrain.summary import write_summary

    def full_disk(self: Path, text: str) -> None:
        with open(self, "w") as f:
            f.write(text[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space"):
        write_summary(tmp_path, {"step": 3})
    assert list(tmp_path.iterdir()) == []


def test_async_checkpoints_equal_sync_ones(corpus, tmp_path):
    from pretrain.checkpoint import list_checkpoints, verify_checkpoint
    from trainer_helpers import weights

    Trainer(tiny_config(tmp_path / "sync", corpus, 4)).train()
    Trainer(tiny_config(tmp_path / "async", corpus, 4, "--checkpoint.async_save=true")).train()
    saved = list_checkpoints(tmp_path / "async" / "checkpoints")
    assert [p.name for p in saved] == ["step_00000002", "step_00000004"]
    assert all(verify_checkpoint(p) is None for p in saved)
    a, b = weights(tmp_path / "sync/checkpoints/step_00000004"), weights(saved[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_fills_the_global_batch(corpus, tmp_path):
    whole = Trainer(tiny_config(tmp_path / "whole", corpus, 3, "--train.global_batch_tokens=128"))
    split = Trainer(tiny_config(tmp_path / "split", corpus, 3, "--train.global_batch_tokens=128",
                                "--train.micro_batch_size=2"))
    assert (whole.grad_accum, split.grad_accum) == (1, 2) and split.tokens_per_step == 128
    whole.train()
    split.train()
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(b[s][0] == pytest.approx(a[s][0], rel=1e-5) for s in a)
    from pretrain.config import ConfigError
    with pytest.raises(ConfigError, match="train.global_batch_tokens"):
        Trainer(tiny_config(tmp_path / "bad", corpus, 3, "--train.global_batch_tokens=100"))


def test_compiled_blocks_same_curve_and_checkpoint_keys(corpus, tmp_path):
    eager = Trainer(tiny_config(tmp_path / "eager", corpus, 2, "--arch", "llama"))
    eager.train()
    compiled = Trainer(tiny_config(tmp_path / "compiled", corpus, 2, "--arch", "llama", "--train.compile=true"))
    compiled.train()
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2]
    assert all(b[s][0] == pytest.approx(a[s][0], rel=1e-5) for s in a)
    resumed = Trainer(tiny_config(tmp_path / "x", corpus, 2, "--arch", "llama",
                                  f"--resume-from={tmp_path / 'compiled/checkpoints/step_00000002'}"))
    assert resumed.resume() and resumed.progress.step == 2


def test_signal_during_the_last_step_finishes_the_run(corpus, tmp_path):
    """SIGTERM while the last step runs: the run is complete, so no preemption exit (75) and requeue."""
    trainer = Trainer(tiny_config(tmp_path, corpus, 3))
    signal_during_step(trainer, 3)
    summary = trainer.train()
    assert summary["status"] == "finished" and summary["exit_code"] == 0 and summary["step"] == 3
    assert summary["checkpoint"].endswith("step_00000003")


def test_async_save_commits_within_a_step_and_summary_names_only_committed(corpus, tmp_path, monkeypatch):
    """An async save is committed at the first step after every rank finished writing it (not at the
    next save), and an uncommitted one is never named. The writes finish when the test says:
    step 2's and 4's at once, step 6's never; then the run dies abruptly in step 7."""
    import pretrain.checkpoint as checkpoint

    def async_save(state, storage_writer, process_group=None):
        checkpoint.dcp.save(state, storage_writer=storage_writer)
        future = Future()
        if not str(storage_writer.path).endswith("step_00000006"):
            future.set_result(None)
        return future

    monkeypatch.setattr(checkpoint.dcp, "async_save", async_save)
    trainer = Trainer(tiny_config(tmp_path, corpus, 10, "--checkpoint.async_save=true"))
    ckpts, train_step, named = tmp_path / "checkpoints", trainer.train_step, {}

    def step_then_crash():
        named[trainer.progress.step] = trainer.last_checkpoint
        if trainer.progress.step == 6:
            raise RuntimeError("node lost")
        return train_step()

    trainer.train_step = step_then_crash
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.train()
    assert all(path is None or verify_checkpoint(path) is None for path in named.values()), named
    assert named[3] == ckpts / "step_00000002" and named[5] == ckpts / "step_00000004"
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and summary["checkpoint"] == str(ckpts / "step_00000004")
    assert find_latest_complete(ckpts) == ckpts / "step_00000004"  # what a SIGKILL at this point leaves


@pytest.mark.parametrize("async_save", [False, True])
def test_throughput_counts_training_time_only(corpus, tmp_path, monkeypatch, async_save):
    """tokens/s leaves out validation and checkpoint time (a fake clock: each step takes 1 s, each
    validation, save and async commit 100 s); an async save is committed between steps (`poll`),
    here in the step after it (windows 2-4 and 4-6 hold one each)."""
    import pretrain.metrics as metrics

    clock = [0.0]
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    trainer = Trainer(tiny_config(tmp_path, corpus, 6, "--logging.log_every=2", "--train.val_every=3",
                                  "--train.val_batches=1", "--checkpoint.every=2",
                                  f"--checkpoint.async_save={str(async_save).lower()}"))

    def taking(seconds, fn):
        def timed(*args):
            clock[0] += seconds
            return fn(*args)
        return timed

    poll, commits = trainer.ckpt.poll, []

    def poll_when_written():
        pending = trainer.ckpt._pending
        if pending is not None and pending.future is not None:
            pending.future.result()  # written: this poll commits
        committed = poll()
        if committed:
            commits.append(trainer.progress.step)
            clock[0] += 100.0
        return committed

    trainer.train_step = taking(1.0, trainer.train_step)
    trainer._validate = taking(100.0, trainer._validate)
    trainer.save_checkpoint = taking(100.0, trainer.save_checkpoint)
    trainer.ckpt.poll = poll_when_written
    trainer.train()
    assert commits == ([3, 5] if async_save else [])  # step 6's: after the loop
    tps = {step: row["perf/tokens_per_s"] for step, row in metric_rows(tmp_path).items() if "perf/tokens_per_s" in row}
    assert tps == {s: pytest.approx(trainer.tokens_per_step) for s in (2, 4, 6)}


def test_validation_nll_is_the_cross_entropy_of_the_validation_batches(corpus, tmp_path):
    """evaluate() is the pure next-token NLL: no MoE auxiliary loss (here enabled for training)."""
    from data_pipeline.loader import build_val_loader

    trainer = Trainer(tiny_config(tmp_path, corpus, 2, "--model.overrides.moe.aux_loss_coef=0.01",
                                  "--train.val_batches=3"))
    trainer.train()  # training forwards leave auxiliary losses in the MoE layers
    nll = trainer.evaluate()
    model, total, count = trainer.model, 0.0, 0
    model.eval()
    with torch.no_grad():
        for batch in build_val_loader(trainer.sources, 32, 4, dp_rank=0, dp_size=1, max_batches=3):
            tokens = batch["tokens"]
            logits = model(tokens[:, :-1])
            total += float(F.cross_entropy(logits.flatten(0, 1).double(), tokens[:, 1:].flatten(), reduction="sum"))
            count += tokens[:, 1:].numel()
    assert count == 3 * 4 * 32 and nll == pytest.approx(total / count, rel=1e-6)


@pytest.mark.parametrize("value", ["0", "abc"])
def test_dry_run_with_a_bad_world_size_is_one_line(value, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", value)
    assert main(["--dry-run", "--arch", "llama", "--size", "tiny"]) == 2
    assert "WORLD_SIZE" in capsys.readouterr().err
