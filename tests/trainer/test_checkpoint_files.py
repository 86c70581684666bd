"""Atomic commit and completeness checks, on small DCP checkpoints written in-process."""
import logging
import time

import torch

from pretrain.checkpoint import CheckpointManager, find_latest_complete, list_checkpoints, verify_checkpoint


def save(mgr, step, value):
    state = {"model": {"w": torch.full((64,), float(value))}}
    return mgr.save(step, state, {"rng": step}, {"step": step}, {"config.toml": "x = 1\n"})


def test_commit_prune_and_load(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=2, async_save=False, is_main=True)
    for step in (1, 2, 3):
        path = save(mgr, step, step)
        assert verify_checkpoint(path) is None
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step_00000002", "step_00000003"]
    target = {"model": {"w": torch.zeros(64)}}
    shared, ranks = mgr.load(find_latest_complete(tmp_path / "ck"), target)
    assert shared["step"] == 3 and ranks == [{"rng": 3}] and torch.equal(target["model"]["w"], torch.full((64,), 3.0))


def test_prune_counts_steps_past_eight_digits(tmp_path):
    """step_100000000 sorts before step_99999999 as a string: by name the older one was never pruned."""
    mgr = CheckpointManager(tmp_path / "ck", keep=1, async_save=False, is_main=True)
    for step in (99_999_999, 100_000_000, 100_000_001):
        save(mgr, step, 0)
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step_100000001"]


def test_async_save_commits_on_wait(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=True, is_main=True)
    path = save(mgr, 5, 5)
    mgr.wait()
    assert verify_checkpoint(path) is None


def test_async_save_is_committed_by_poll_once_written(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", keep=3, async_save=True, is_main=True)
    path = save(mgr, 5, 5)
    for _ in range(1000):  # poll() never blocks; the writer thread finishes within a few polls
        if mgr.poll():
            break
        time.sleep(0.01)
    assert mgr.committed == path and verify_checkpoint(path) is None and not mgr.poll()


def test_incomplete_truncated_or_missing_files_are_skipped(tmp_path, caplog):
    ck = tmp_path / "ck"
    mgr = CheckpointManager(ck, keep=5, async_save=False, is_main=True)
    good = save(mgr, 1, 1)
    truncated = save(mgr, 2, 2)
    missing = save(mgr, 3, 3)
    uncommitted = save(mgr, 4, 4)
    data = next(truncated.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10])
    (missing / "train_state.json").unlink()
    (uncommitted / "COMPLETE.json").unlink()
    (ck / ".tmp-step_00000005").mkdir()  # a save killed before its rename is never listed
    with caplog.at_level(logging.WARNING):
        assert find_latest_complete(ck) == good
    text = caplog.text
    assert "step_00000004" in text and "no COMPLETE.json" in text
    assert "step_00000003" in text and "missing file train_state.json" in text
    assert "step_00000002" in text and "truncated" in text
    CheckpointManager(ck, keep=5, async_save=False, is_main=True)
    assert not (ck / ".tmp-step_00000005").exists()
