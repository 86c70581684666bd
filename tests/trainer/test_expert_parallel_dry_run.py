"""The 128-rank dry run of the 3B expert-parallel config: experts split over ep x efsdp (every rank
holds its share, within 1%), their own FSDP collectives and the all-to-all volume are listed; bad
parallel.ep values fail at start in one line naming the field."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "hybrid_moe_3b_16x8.toml"


def test_3b_ep_config_dry_run(capsys):
    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "128", "--rank", "0", "--rank", "127"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"experts: ep (\d+) x efsdp 16 of dp_shard x cp", out)[1] == "4", out
    assert re.search(r"rank 127 \(.*, ep 3\)", out), out
    held = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
            re.findall(r"parameters +([\d,]+) elements: .*total / shards per tensor: ([\d,]+)", out)]
    assert len(held) == 2 and all(abs(p / e - 1) < 0.01 for p, e in held), out
    a2a = re.search(r"EP all-to-all expert rows \(dispatch, combine\) +4 +(\d+) +([\d.]+)", out)
    # every one of the 22 blocks has an MoE FFN: x 4 micro-batches x (2 forward + 2 recompute + 2
    # backward); each 32768 tokens / (cp 4 x tp 2) x top-1 x 3/4 leaving the rank x d_model 3072 x 2 bytes
    assert a2a and int(a2a[1]) == 22 * 4 * 6, out
    assert float(a2a[2]) == pytest.approx(4096 * 0.75 * 3072 * 2 / 2**20, rel=1e-3)
    assert "EP experts: FSDP all-gather params over efsdp (bf16)        16" in out
    # selective checkpointing keeps the all-to-alls' outputs: no exchange in the recompute
    assert main(["--config", str(CONFIG), "--dry-run", "--world-size", "128", "--train.ac_mode=selective"]) == 0
    out = capsys.readouterr().out
    assert int(re.search(r"EP all-to-all expert rows \(dispatch, combine\) +4 +(\d+)", out)[1]) == 22 * 4 * 4, out


@pytest.mark.parametrize("argv, needle", [
    (["--arch", "llama", "--parallel.ep=2"], "parallel.ep=2 needs an MoE model"),
    (["--arch", "hybrid_moe", "--parallel.ep=3"], "parallel.ep=3 must be >= 1 and divide dp_shard*cp=4"),
    (["--arch", "hybrid_moe", "--parallel.ep=4", "--parallel.dp_replicate=2"], "divide dp_shard*cp=2"),
    (["--arch", "hybrid_moe", "--parallel.ep=0"], "parallel.ep = 0 must be >= 1"),
])
def test_bad_ep_fails_in_one_line(argv, needle, corpus, capsys):
    assert main(["--size", "tiny", "--data", str(corpus), "--dry-run", "--world-size", "4", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_ep_must_divide_the_experts(corpus, capsys):
    argv = ["--arch", "hybrid_moe", "--size", "tiny", "--data", str(corpus), "--dry-run", "--world-size", "6"]
    assert main([*argv, "--parallel.ep=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "parallel.ep=3 must divide the number of experts 8 (model moe.n_experts)" in err and "\n" not in err, err
