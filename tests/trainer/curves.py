"""Comparing a run's logged losses with a reference run's (multi-process layouts vs one process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer_helpers import losses


def val_nll(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val/nll"] for r in records if "val/nll" in r}


def assert_close_curves(run_dir: Path, reference: Path, steps: range, validation: bool = False) -> None:
    """The training loss of every step in `steps` (the last logged, should a step be redone) is the
    reference's to rel 1e-5; with `validation`, every validation NLL the run logged too."""
    got, ref = losses(run_dir), losses(reference)
    assert sorted(got) == list(steps)
    for step in steps:
        assert got[step][-1] == pytest.approx(ref[step][0], rel=1e-5), step
    if validation:
        got_val, ref_val = val_nll(run_dir), val_nll(reference)
        assert got_val and all(got_val[s] == pytest.approx(ref_val[s], rel=1e-5) for s in got_val), (got_val, ref_val)
