"""`python -m pretrain.scaling plan` rules and `run --render`: the paper's LRs at its sizes, batches
that give every point its minimum steps, tokens from the accounting's FLOPs per token, one-line
errors, and cluster jobs rendered through launch.render for the unfinished points only."""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time

import pytest

from data_pipeline.manifest import read_manifest
from pretrain.accounting import count_params, flops_per_token
from pretrain.model.presets import model_config
from pretrain.scaling.__main__ import main
from pretrain.scaling.plan import read_plan
from pretrain.scaling.rules import PAPER_LR, batch_tokens, peak_lr


def test_lr_rule_is_the_papers_at_its_sizes_and_monotone_between():
    for params, lr in PAPER_LR:
        assert peak_lr(params) == pytest.approx(lr)
    assert peak_lr(1e6) == pytest.approx(6e-3) and peak_lr(1e11) == pytest.approx(3e-4)
    grid = [peak_lr(n) for n in (1e8, 2e8, 3.5e8, 6e8, 9.7e8, 2e9)]
    assert grid == sorted(grid, reverse=True)


def test_batch_rule_halves_until_the_minimum_steps():
    assert batch_tokens(1e12, 1 << 19, 8192, 100) == 1 << 19
    assert batch_tokens(100 * (1 << 17), 1 << 19, 8192, 100) == 1 << 17
    assert batch_tokens(10, 1 << 19, 8192, 100) == 8192  # never below one micro-batch window
    with pytest.raises(ValueError, match="not a multiple"):
        batch_tokens(1e9, 1000, 8192, 100)


@pytest.fixture
def plan(tmp_path, corpus, capsys):
    out = tmp_path / "plan"
    assert main(["plan", "--archs", "llama", "inter_hybrid_moe", "--sizes", "tiny", "tiny:d_model=96,d_ffn=288",
                 "--budgets", "1e11", "--data", str(corpus), "--out", str(out), "--seq-len", "64",
                 "--micro-batch-size", "2", "--batch-tokens", "1024", "--min-steps", "10",
                 "--flops-per-gpu-s", "1e9"]) == 0
    return out, capsys.readouterr().out


def test_plan_points_follow_the_accounting(plan, corpus):
    out, printed = plan
    _, points = read_plan(out)
    assert [p.id for p in points] == ["llama-tiny-1e11", "llama-tiny_d_model_96_d_ffn_288-1e11",
                                      "inter_hybrid_moe-tiny-1e11", "inter_hybrid_moe-tiny_d_model_96_d_ffn_288-1e11"]
    moe = points[2]
    assert moe.params < moe.total_params  # MoE: active parameters, the routed experts not taken count less
    vocab = read_manifest(corpus).vocab_size
    wide = {"d_model": 96, "d_ffn": 288}
    for p, (arch, width) in zip(points, [("llama", {}), ("llama", wide), ("inter_hybrid_moe", {}),
                                         ("inter_hybrid_moe", wide)]):
        cfg = model_config(arch, "tiny", vocab_size=vocab, **width)
        assert p.flops_per_token == flops_per_token(cfg, 64)["total"]
        assert p.params == count_params(cfg)["active_non_embedding"]
    for p in points:
        assert p.steps == round(1e11 / p.flops_per_token / p.batch_tokens) and p.steps >= 10
        assert p.lr == pytest.approx(peak_lr(p.params))
    hours = sum(p.flops for p in points) / 1e9 / 3600
    assert f"cost: {hours:,.2f} GPU-hours" in printed and "4 runs" in printed


def test_render_slurm_jobs_for_unfinished_points(plan):
    out, _ = plan
    _, points = read_plan(out)
    done = points[1]
    (out / "runs" / done.id).mkdir(parents=True)
    (out / "runs" / done.id / "summary.json").write_text(json.dumps({"status": "finished", "step": done.steps}))
    assert main(["run", str(out), "--render", "slurm", "--", "--nodes", "1", "--gpus-per-node", "1",
                 "--partition", "gpu"]) == 0
    submit = (out / "slurm" / "submit.sh").read_text()
    assert [line.split()[1] for line in submit.splitlines() if line.startswith("sbatch")] == \
        [f"{p.id}.sbatch" for p in points if p is not done]
    job = (out / "slurm" / f"{points[0].id}.sbatch").read_text()
    assert points[0].config in job and points[0].run_dir in job and "#SBATCH --partition=gpu" in job


@pytest.mark.parametrize("args, says", [
    (["plan", "--archs", "llama", "--sizes", "tiny:d_model", "--budgets", "1e11"], "is not FIELD=VALUE"),
    (["plan", "--archs", "gpt", "--sizes", "tiny", "--budgets", "1e11"], "unknown --arch 'gpt'"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "-1"], "budgets are positive"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e3"], "every budget is too small for one step"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "inf"], "budgets are positive, finite"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "tiny", "--budgets", "1e11"], "--sizes: tiny given more than once"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "1e11"], "--budgets: 1e11 given more"),
    (["plan", "--archs", "llama", "llama", "--sizes", "tiny", "--budgets", "1e11"], "--archs: llama given more"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--set=--train.steps=5"],
     "--set --train.steps=5: train.steps is set by the plan"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--set=--size=1b"],
     "model.size is set by the plan"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--set=--run-dir=/x"], "run_dir is set"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--set=--train.global-batch-tokens=8"],
     "train.global_batch_tokens is set"),  # the trainer reads dashes in keys as underscores
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--set=--dry-run"], "dry_run is set"),
    (["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--flops-per-gpu-s", "-5"],
     "--flops-per-gpu-s -5.0: an achieved FLOP/s per device is positive"),
    (["run", "NOPLAN", "--nproc-per-node", "0"], "--nproc-per-node 0: must be >= 1"),
    (["fit", "NOPLAN"], "no plan.json"),
    (["run", "NOPLAN", "--", "--nodes", "1"], "launch.render options"),
])
def test_bad_input_is_one_line(tmp_path, corpus, capsys, args, says):
    if args[0] == "plan":
        args = [*args, "--data", str(corpus), "--out", str(tmp_path / "p")]
    assert main([a.replace("NOPLAN", str(tmp_path / "none")) for a in args]) == 2
    err = capsys.readouterr().err
    assert says in err and len(err.strip().splitlines()) == 1, err


def test_a_corner_too_small_for_one_step_is_left_out_and_said(tmp_path, corpus, caplog):
    assert main(["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e3", "1e13", "--data", str(corpus),
                 "--out", str(tmp_path / "p")]) == 0
    _, points = read_plan(tmp_path / "p")
    assert [p.budget for p in points] == [1e13] and "left out llama tiny at 1e+03" in caplog.text


def test_budgets_that_round_alike_get_points_of_their_own(tmp_path, corpus):
    """1e11 and 1.4e11 were both 'llama-tiny-1e11' (one run dir, one config for two points)."""
    assert main(["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "1.4e11", "--data", str(corpus),
                 "--out", str(tmp_path / "p"), "--seq-len", "64", "--batch-tokens", "1024", "--min-steps", "1"]) == 0
    _, points = read_plan(tmp_path / "p")
    assert [p.id for p in points] == ["llama-tiny-1e11", "llama-tiny-1.4e11"]
    assert len({p.run_dir for p in points}) == len({p.config for p in points}) == 2
    assert points[0].steps < points[1].steps


def test_replanning_a_planned_point_differently_is_refused(tmp_path, corpus, capsys, caplog):
    """A point's run may have trained: `run` would resume it under the new settings and count it as
    the new point. The same plan again, or one that adds points, is fine."""
    base = ["plan", "--archs", "llama", "--sizes", "tiny", "--data", str(corpus), "--out", str(tmp_path / "p"),
            "--seq-len", "64", "--min-steps", "1"]
    assert main([*base, "--budgets", "1e11", "--batch-tokens", "1024"]) == 0
    before = (tmp_path / "p" / "points" / "llama-tiny-1e11.toml").read_text()
    assert main([*base, "--budgets", "1e11", "--batch-tokens", "1024"]) == 0  # the same again
    assert main([*base, "--budgets", "1e11", "2e11", "--batch-tokens", "1024"]) == 0  # extended
    assert [p.id for p in read_plan(tmp_path / "p")[1]] == ["llama-tiny-1e11", "llama-tiny-2e11"]
    capsys.readouterr()
    assert main([*base, "--budgets", "1e11", "--batch-tokens", "512"]) == 2
    err = capsys.readouterr().err
    assert "point llama-tiny-1e11 is already planned there with other settings" in err and err.count("\n") == 1
    assert (tmp_path / "p" / "points" / "llama-tiny-1e11.toml").read_text() == before  # nothing written
    assert len(read_plan(tmp_path / "p")[1]) == 2
    with caplog.at_level(logging.WARNING):  # a grid without a point planned before: said, its files kept
        assert main([*base, "--budgets", "2e11", "--batch-tokens", "1024"]) == 0
    assert "are not in this grid and leave plan.json" in caplog.text and "llama-tiny-1e11" in caplog.text
    assert (tmp_path / "p" / "points" / "llama-tiny-1e11.toml").read_text() == before


@pytest.mark.parametrize("text", ['{"spec": {}, "points": []}', "[1]", '{"spec": '])
def test_a_damaged_plan_file_is_one_line(tmp_path, capsys, text):
    (tmp_path / "plan.json").write_text(text)
    assert main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'plan.json'}: not a plan written by `plan`" in err and err.count("\n") == 1


def test_plan_out_that_is_a_file_is_one_line(tmp_path, corpus, capsys):
    (tmp_path / "taken").write_text("x")
    assert main(["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--data", str(corpus),
                 "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot create the directory" in err and err.count("\n") == 1


def test_ctrl_c_during_run_exits_130_without_a_traceback(plan, monkeypatch, capsys):
    import pretrain.scaling.run as run

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "run_local", interrupted)
    assert main(["run", str(plan[0])]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted; run again") and "Traceback" not in err


def test_ctrl_c_preempts_the_trainer_and_waits_for_it(tmp_path):
    """An interrupt that reached `run` alone (kill -INT, a wrapper) must not leave the trainer
    training beside the next `run`: it gets SIGTERM (it checkpoints) and `run` waits for it."""
    from pretrain.scaling.run import run_forwarding_signals

    up, stopped = tmp_path / "up", tmp_path / "stopped"
    child = (f"import signal, sys, time\n"
             f"def stop(*_):\n    open({str(stopped)!r}, 'w').close(); sys.exit(75)\n"
             f"signal.signal(signal.SIGTERM, stop)\nopen({str(up)!r}, 'w').close()\ntime.sleep(60)\n")

    def interrupt_once_up() -> None:
        while not up.exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # pytest-xdist workers ignore SIGINT
    try:
        threading.Thread(target=interrupt_once_up, daemon=True).start()
        with open(tmp_path / "out", "w") as out, pytest.raises(KeyboardInterrupt):
            run_forwarding_signals([sys.executable, "-c", child], dict(os.environ), out)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.exists()


def test_a_bad_throughput_run_leaves_no_plan_behind(tmp_path, corpus, capsys):
    assert main(["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--data", str(corpus),
                 "--out", str(tmp_path / "p"), "--throughput", str(tmp_path / "norun")]) == 2
    assert "--throughput" in capsys.readouterr().err and not (tmp_path / "p").exists()


def test_throughput_from_a_run_trained_from_another_directory(tmp_path, corpus, capsys):
    """summary.json names the checkpoint as the trainer was given the run dir (relative to where it
    ran): --throughput finds it under the run dir wherever `plan` runs; a run without tokens/s or a
    checkpoint is told apart."""
    from pretrain.checkpoint import MODEL_CONFIG_FILE, model_config_json

    run = tmp_path / "elsewhere" / "runs" / "tput"
    step = run / "checkpoints" / "step_00000006"
    step.mkdir(parents=True)
    cfg = model_config("llama", "tiny")
    (step / MODEL_CONFIG_FILE).write_text(model_config_json(cfg))
    (step / "config.toml").write_text("[data]\nseq_len = 64\n")
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "perf/tokens_per_s": t}) + "\n"
                                               for s, t in ((2, 900.0), (4, 1000.0), (6, 1100.0))))
    (run / "summary.json").write_text(json.dumps({"checkpoint": "runs/tput/checkpoints/step_00000006",
                                                  "world_size": 2}))
    args = ["plan", "--archs", "llama", "--sizes", "tiny", "--budgets", "1e11", "--data", str(corpus)]
    assert main([*args, "--out", str(tmp_path / "p"), "--throughput", str(run)]) == 0
    rate = 1000.0 * flops_per_token(cfg, 64)["total"] / 2
    assert f"at {rate:.3e} FLOP/s per device ({run}: 1,000 tokens/s on 2 device(s)" in capsys.readouterr().out
    (run / "summary.json").write_text(json.dumps({"checkpoint": None}))
    assert main([*args, "--out", str(tmp_path / "q"), "--throughput", str(run)]) == 2
    assert "its summary.json names no checkpoint" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 5.0}) + "\n")
    assert main([*args, "--out", str(tmp_path / "r"), "--throughput", str(run)]) == 2
    assert "logged no perf/tokens_per_s" in capsys.readouterr().err


def test_run_on_more_ranks_than_a_points_batch_splits_over_is_refused_at_start(plan, capsys):
    assert main(["run", str(plan[0]), "--nproc-per-node", "16"]) == 2
    err = capsys.readouterr().err
    assert "is not a multiple of 16 data-parallel ranks x micro-batch 2 x seq_len 64; run with the plan's --ranks 1" \
        in err
    assert err.count("\n") == 1 and not (plan[0] / "runs").exists()


def test_fit_tells_unfinished_from_finished_without_an_nll_and_names_a_damaged_summary(plan, capsys):
    _, points = read_plan(plan[0])
    for p, nll in zip(points, (3.0, None, float("nan"))):
        (plan[0] / "runs" / p.id).mkdir(parents=True)
        (plan[0] / "runs" / p.id / "summary.json").write_text(json.dumps(
            {"status": "finished", "step": p.steps, "last_val_nll": nll}))
    assert main(["fit", str(plan[0])]) == 0
    out = capsys.readouterr().out
    result = json.loads((plan[0] / "fit.json").read_text())
    assert result["missing"] == [points[3].id] and result["without_nll"] == [points[1].id, points[2].id]
    assert f"finished without a finite validation NLL (left out of the fit; diverged, or an empty validation split" \
           in out and f"not finished (left out of the fit): {points[3].id}" in out
    damaged = plan[0] / "runs" / points[0].id / "summary.json"
    damaged.write_text('{"status": "fini')
    for cmd in ("fit", "run"):
        assert main([cmd, str(plan[0])]) == 2
        err = capsys.readouterr().err
        assert f"{damaged}: not a run summary" in err and err.count("\n") == 1, err
