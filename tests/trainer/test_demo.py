"""`make demo`'s entry point refuses what it cannot do before building anything (the whole demo
runs in `make demo`; CI's time goes to the tests)."""
from __future__ import annotations

import pytest

from pretrain import demo


def test_a_run_directory_that_is_not_a_demo_is_not_cleared(tmp_path, capsys):
    """The demo deletes its run directory's checkpoints and metrics before training: a real run
    given as --run-dir (no demo corpus in data/) is refused and left as it was."""
    (tmp_path / "checkpoints" / "step_00000100").mkdir(parents=True)
    (tmp_path / "metrics.jsonl").write_text('{"step": 100}\n')
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--run-dir", str(tmp_path)])
    assert exit_.value.code == 2
    assert "holds a training run that is not a demo's (checkpoints, metrics.jsonl" in capsys.readouterr().err
    assert (tmp_path / "checkpoints" / "step_00000100").is_dir() and (tmp_path / "metrics.jsonl").read_text()


def test_steps_below_one_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--run-dir", str(tmp_path), "--steps", "0"])
    assert exit_.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
