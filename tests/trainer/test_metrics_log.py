"""metrics.jsonl and TensorBoard after a resume: one row (event) per step of the trajectory being
trained; the rows a resumed run redoes, and a line cut mid-write, move to metrics.superseded.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.metrics import METRICS_FILE, SUPERSEDED_FILE, MetricsLogger, set_aside_rows_after


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def logger(run_dir: Path, tensorboard: bool = False) -> MetricsLogger:
    return MetricsLogger(run_dir, enabled=True, tensorboard=tensorboard, flops_per_token=1.0,
                         peak_flops_total=1.0, total_steps=10)


def write_rows(run_dir: Path, steps: list[int], tail: str = "") -> None:
    lines = [json.dumps({"step": s, "train/loss": float(s)}) + "\n" for s in steps]
    (run_dir / METRICS_FILE).write_text("".join(lines) + tail)


def test_rows_after_the_resumed_step_and_a_cut_line_move_aside(tmp_path):
    write_rows(tmp_path, [1, 2, 2, 3, 4], tail='{"step": 5, "train/lo')
    assert set_aside_rows_after(tmp_path, 2) == 3
    assert [r["step"] for r in rows(tmp_path / METRICS_FILE)] == [1, 2, 2]
    moved = (tmp_path / SUPERSEDED_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in moved[:2]] == [3, 4] and moved[2] == '{"step": 5, "train/lo'
    write_rows(tmp_path, [1, 2, 3])
    assert set_aside_rows_after(tmp_path, -1) == 3  # a fresh start: every row is another run's
    assert (tmp_path / METRICS_FILE).read_text() == ""
    assert len((tmp_path / SUPERSEDED_FILE).read_text().splitlines()) == 6  # 3 + 3 appended, nothing lost


def test_nothing_to_move_leaves_the_files_alone(tmp_path):
    assert set_aside_rows_after(tmp_path, 3) == 0  # no metrics.jsonl yet
    write_rows(tmp_path, [1, 2, 3])
    before = (tmp_path / METRICS_FILE).stat().st_mtime_ns
    assert set_aside_rows_after(tmp_path, 3) == 0
    assert (tmp_path / METRICS_FILE).stat().st_mtime_ns == before and not (tmp_path / SUPERSEDED_FILE).exists()


def test_a_line_that_is_json_without_a_step_moves_aside(tmp_path):
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\n[1, 2]\n{"loss": 3}\n')
    assert set_aside_rows_after(tmp_path, 5) == 2
    assert rows(tmp_path / METRICS_FILE) == [{"step": 1}]


def test_tensorboard_purges_the_steps_a_resumed_run_redoes(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = logger(tmp_path, tensorboard=True)
    first.open(-1)
    for step in range(1, 6):
        first.log(step, {"train/loss": float(step)}, progress=False)
    first.close()
    resumed = logger(tmp_path, tensorboard=True)
    resumed.open(3)
    for step in (4, 5):
        resumed.log(step, {"train/loss": 10.0 * step}, progress=False)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 3.0),
                                                                          (4, 40.0), (5, 50.0)]
    assert [r["train/loss"] for r in rows(tmp_path / METRICS_FILE)] == [1.0, 2.0, 3.0, 40.0, 50.0]
    assert [r["train/loss"] for r in rows(tmp_path / SUPERSEDED_FILE)] == [4.0, 5.0]


def test_a_disabled_logger_writes_nothing(tmp_path):
    quiet = MetricsLogger(tmp_path, enabled=False, tensorboard=True, flops_per_token=1.0, peak_flops_total=1.0,
                          total_steps=1)
    quiet.open(-1)
    quiet.log(1, {"train/loss": 1.0})
    quiet.close()
    assert list(tmp_path.iterdir()) == []
