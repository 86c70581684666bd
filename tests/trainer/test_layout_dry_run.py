"""The 128-rank dry run (fake process group, meta tensors): the 16 x 8 example configs lay out, each
representative rank's parameter count equals the total divided by each tensor's shards within 1%,
every rank holds about the same, and bad --world-size / --rank values fail in one line."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pretrain.main import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*_16x8.toml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_16x8_config_dry_runs_at_128_ranks(config, capsys):
    assert main(["--config", str(config), "--dry-run", "--world-size", "128", "--rank", "0", "--rank", "77"]) == 0
    out = capsys.readouterr().out
    layout = re.search(r"layout +128 ranks = pp 1 x dp_replicate 1 x dp_shard (\d+) x cp (\d+) x tp (\d+)", out)
    assert layout and int(layout[2]) > 1 and int(layout[3]) > 1, out
    held = [(int(a.replace(",", "")), int(b.replace(",", ""))) for a, b in
            re.findall(r"parameters +([\d,]+) elements: .*total / shards per tensor: ([\d,]+)", out)]
    assert len(held) == 2, out
    for params, expected in held:
        assert abs(params / expected - 1) < 0.01
    assert abs(held[0][0] / held[1][0] - 1) < 0.01  # ranks 0 and 77 hold about the same
    for kind in ("FSDP all-gather", "TP reduce-scatter", "CP all-to-all Mamba2"):
        assert kind in out


@pytest.mark.parametrize("argv, needle", [
    (["--world-size", "128", "--rank", "128"], "--rank 128 is not a rank of world size 128"),
    (["--world-size", "102"], "does not divide world size 102"),
    (["--world-size", "128", "--parallel.tp=3"], "data.seq_len"),
    (["--world-size", "-2"], "--world-size -2 is not a rank count"),
    (["--world-size", "0"], "--world-size 0 is not a rank count"),
    (["--world-size", "128", "--parallel.pp=2"], "error: config: parallel.pp_microbatches=2 must divide"),
])
def test_bad_layout_arguments_fail_in_one_line(argv, needle, capsys):
    config = REPO / "configs" / "hybrid_moe_1b_16x8.toml"
    assert main(["--config", str(config), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


TINY = ["--arch", "hybrid_moe", "--size", "tiny", "--data.seq_len=32", "--model.overrides.tie_embeddings=false"]


@pytest.mark.parametrize("argv, needle", [
    # what parallelize_hybrid refuses for the run's own options, which the dry run now passes it
    (["--arch", "llama", "--parallel.tp=2", "--train.fp8=tensorwise"], "train.fp8=tensorwise is not supported"),
    (["--model.overrides.moe.aux_loss_coef=0.1", "--parallel.cp=2"], "needs model.overrides.moe.aux_loss_coef=0"),
    # a middle pipeline stage (ranks 2-3 of 6) is checked too, not just the first and last rank
    (["--world-size", "6", "--parallel.pp=3", "--parallel.tp=2", "--model.overrides.pattern=MM|MH|MM",
      "--train.micro_batch_size=3"], "model.overrides.intra.kv_heads=1"),
])
def test_the_dry_run_refuses_what_the_run_would(argv, needle, capsys):
    world = [] if "--world-size" in argv else ["--world-size", "2"]
    assert main([*TINY, "--dry-run", *world, *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


def test_rank_without_dry_run_is_refused(capsys):
    assert main([*TINY, "--rank", "1"]) == 2
    assert "--rank only goes with --dry-run" in capsys.readouterr().err
