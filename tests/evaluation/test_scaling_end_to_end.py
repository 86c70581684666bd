"""`python -m pretrain.scaling plan -> run -> fit` on CPU: a tiny grid (2 archs x 3 widths x 2
budgets) trained on the test corpus, preempted once and resumed, finished points skipped, and the
fit built from the runs' own final validation NLLs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_helpers import REPO
from image_checks import assert_nonempty_png

from pretrain.scaling.__main__ import main
from pretrain.scaling.plan import read_plan

SIZES = ["tiny:d_model=32,d_ffn=96,d_ssm=64", "tiny", "tiny:d_model=128,d_ffn=384,d_ssm=256"]


def scaling(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pretrain.scaling", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_plan_run_fit(tmp_path, corpus, capsys):
    plan = tmp_path / "plan"
    assert main(["plan", "--archs", "llama", "mamba2", "--sizes", *SIZES, "--budgets", "2e10", "4e10",
                 "--data", str(corpus), "--out", str(plan), "--seq-len", "64", "--micro-batch-size", "4",
                 "--batch-tokens", "1024", "--min-steps", "8", "--val-batches", "2",
                 "--set=--train.device=cpu", "--set=--logging.tensorboard=false"]) == 0
    printed = capsys.readouterr().out
    _, points = read_plan(plan)
    assert len(points) == 12 and "12 runs" in printed
    for p in points:  # tokens from the true FLOPs per token, whole steps of the chosen batch
        assert p.tokens == p.steps * p.batch_tokens
        assert abs(p.flops - p.budget) <= p.batch_tokens * p.flops_per_token / 2 + 1
        assert f"steps = {p.steps}\n" in open(p.config).read()

    first = points[0]
    proc = scaling("run", str(plan))
    log = plan / "runs" / f"{first.id}.out"
    deadline = time.monotonic() + 120
    while not (log.is_file() and log.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # preempt the sweep while it trains the first point
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out
    assert json.loads((plan / "runs" / first.id / "summary.json").read_text())["status"] == "preempted"

    proc = scaling("run", str(plan))
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0 and "12/12 points finished" in out, out
    proc = scaling("run", str(plan))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and out.count("already finished, skipped") == 12, out

    assert main(["fit", str(plan)]) == 0
    result = json.loads((plan / "fit.json").read_text())
    assert result["missing"] == [] and set(result["fits"]) == {"llama", "mamba2"}
    for arch, f in result["fits"].items():
        assert [c["budget"] for c in f["isoflop"]] == [2e10, 4e10]
        for curve in f["isoflop"]:
            runs = [p for p in points if p.arch == arch and p.budget == curve["budget"]]
            assert curve["nll"] == [json.loads((plan / "runs" / p.id / "summary.json").read_text())["last_val_nll"]
                                    for p in sorted(runs, key=lambda p: p.params)]
            assert len(curve["coef"]) == 3
    for name in result["plots"].values():
        assert_nonempty_png(plan / name)
