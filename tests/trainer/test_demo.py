"""`make demo`'s entry point refuses what it cannot do before building anything (the whole demo
runs in `make demo`; CI's time goes to the tests)."""
from __future__ import annotations

import pytest

from pretrain import demo


def a_run(run_dir, sources: list[str]) -> None:
    """What a trainer leaves: a checkpoint (its config.toml names the data) and metrics."""
    step = run_dir / "checkpoints" / "step_00000100"
    step.mkdir(parents=True)
    (step / "config.toml").write_text(f"[data]\nsources = {sources!r}\n".replace("'", '"'))
    (step / "train_state.json").write_text('{"dp_size": 1, "ranks": [{}]}')
    (run_dir / "metrics.jsonl").write_text('{"step": 100}\n')
    (run_dir / "data").mkdir()
    (run_dir / "data" / "manifest.json").write_text("{}")  # its own prepared data beside it


def test_a_run_directory_that_is_not_a_demo_is_not_cleared(tmp_path, capsys):
    """The demo deletes its run directory's checkpoints and metrics before training: a real run
    given as --run-dir (trained on other data, even with a prepared dir in data/) is refused and
    left as it was."""
    a_run(tmp_path, [str(tmp_path / "data"), "/shared/dclm"])
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--run-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "holds a training run that is not a demo's (checkpoints, metrics.jsonl)" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_00000100").is_dir() and (tmp_path / "metrics.jsonl").read_text()


def test_a_demo_run_directory_is_recognised(tmp_path):
    """The demo's marker, or (an older demo's) checkpoints trained on RUN_DIR/data alone."""
    old = tmp_path / "old"
    a_run(old, [str(old / "data")])
    assert demo.made_by_demo(old)
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / demo.DEMO_MARKER).touch()
    assert demo.made_by_demo(marked) and not demo.made_by_demo(tmp_path)


def test_steps_below_one_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--run-dir", str(tmp_path), "--steps", "0"])
    assert exit_.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
