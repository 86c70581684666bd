"""The 128-rank dry run of the pipelined 3B config (pp, tp, cp and ep > 1): the stages (first with the embedding, last
with the head) and the schedule's bubble are printed, and each representative rank - one per
pipeline end - holds the total / shards of its stages' parameters within 1%."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.torch_version import TorchVersion

from parallel.pipeline import SPLIT_BACKWARD_TORCH, torch_release
from pretrain.main import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "hybrid_moe_3b_16x8_pp.toml"


def test_pp_config_dry_runs_at_128_ranks(capsys):
    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "128", "--rank", "0", "--rank", "127"]) == 0
    out = capsys.readouterr().out
    layout = re.search(r"layout +128 ranks = pp (\d+) x dp_replicate 1 x dp_shard \d+ x cp (\d+) x tp (\d+)", out)
    assert layout and all(int(layout[i]) > 1 for i in (1, 2, 3)), out
    pp = int(layout[1])
    assert re.search(r"\(experts: ep [2-9]\d* x efsdp", out) and "EP all-to-all expert rows" in out, out
    bubble = re.search(r"interleaved_1f1b: (\d+) stages \(2 per pp rank\), 8 microbatches .*bubble ([\d.]+)%", out)
    assert bubble and int(bubble[1]) == 2 * pp
    assert float(bubble[2]) == round(100 * (pp - 1) / (2 * 8 + pp - 1), 1)
    stages = re.findall(r"stage (\d+) +blocks (\d+)-(\d+) .* params( \(\+embedding\))?( \(\+head\))?", out)
    assert len(stages) == 2 * pp and stages[0][3] and stages[-1][4] and int(stages[-1][2]) == 21
    assert re.search(rf"rank 0 \(pp 0,.*: stages \[0, {pp}\]", out), out  # interleaved: stages r and r + pp
    assert re.search(rf"rank 127 \(pp {pp - 1},.*: stages \[{pp - 1}, {2 * pp - 1}\]", out), out
    held = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
            re.findall(r"parameters +([\d,]+) elements: .*total / shards per tensor: ([\d,]+)", out)]
    assert len(held) == 2 and all(abs(p / e - 1) < 0.01 for p, e in held), out
    assert "PP send/recv activations + grads" in out
    idle = re.search(r"idle in torch.s action order .* by pp rank: (.*)", out)
    assert idle and len(idle[1].split(", ")) == pp, out


@pytest.mark.skipif(torch_release() < SPLIT_BACKWARD_TORCH, reason="the V schedules need torch >= 2.13 (refused: "
                    "test_split_backward_schedules_are_refused_before_torch_2_13)")
def test_zero_bubble_order_idles_less_than_interleaved(capsys):
    idle = {}
    for schedule in ("interleaved_1f1b", "zbv"):
        assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "128", f"--parallel.pp_schedule={schedule}"]) == 0
        line = re.search(r"idle in torch.s action order .* by pp rank: (.*)", capsys.readouterr().out)[1]
        idle[schedule] = [float(f.rstrip("%")) for f in line.split(", ")]
    assert max(idle["zbv"]) < min(idle["interleaved_1f1b"]), idle


@pytest.mark.parametrize("schedule", ["zbv", "dualpipev"])
def test_split_backward_schedules_are_refused_before_torch_2_13(schedule, monkeypatch, capsys):
    """torch 2.11's split backward stops in the weight pass of our models: the run is refused at start."""
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.11.0+cu130"))  # as torch reports it
    args = ["--config", str(CONFIG), "--dry-run", "--world-size", "128", f"--parallel.pp_schedule={schedule}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"parallel.pp_schedule={schedule!r} needs torch >= 2.13" in err[0], err
    assert "use one of 1f1b, interleaved_1f1b" in err[0], err
