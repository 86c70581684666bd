"""`python -m pretrain.evaluate`: every suite on two tiny checkpoints (dense and MoE), one JSON and
the figures, the comparison, and one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import MICRO_BATCH, REPO, TRAIN_SEQ_LEN, VAL_BATCHES, train_tiny
from image_checks import assert_nonempty_png

from pretrain.evaluate import main

SMALL = ["--positions-docs", "2", "--niah-lengths", "2,3", "--niah-depths", "0,1", "--niah-trials", "1",
         "--inference-batch", "2", "--inference-totals", "8,16"]


@pytest.fixture(scope="module")
def evaluated(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    step_dir = sorted((runs["hybrid_moe"] / "checkpoints").glob("step_*"))[-1]
    assert main(["--checkpoint", str(runs["inter_hybrid"]), str(step_dir), "--out", str(out),
                 "--batch-size", str(MICRO_BATCH), "--nll-batches", str(VAL_BATCHES), *SMALL]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_results_hold_every_suite_for_every_checkpoint(evaluated, runs):
    out, results = evaluated
    assert [e["label"] for e in results["checkpoints"]] == ["inter_hybrid", "hybrid_moe"]
    for entry, run in zip(results["checkpoints"], runs.values()):
        summary = json.loads((run / "summary.json").read_text())
        # the trainer's own validation (same split, window, batch and batch count) is the reference
        assert entry["nll"]["nll"] == pytest.approx(summary["last_val_nll"], rel=1e-5)
        assert entry["nll"]["tokens"] == VAL_BATCHES * MICRO_BATCH * TRAIN_SEQ_LEN
        assert entry["tokens_seen"] == summary["tokens_seen"] and entry["train_seq_len"] == TRAIN_SEQ_LEN
        pos = entry["positions"]
        assert pos["length"] == 3 * TRAIN_SEQ_LEN and len(pos["bin_nll"]) == 64
        assert all(math.isfinite(v) for v in pos["bin_nll"])
        assert len(entry["niah"]["accuracy"]) == 2 and len(entry["niah"]["accuracy"][0]) == 2
        assert [p["total"] for p in entry["inference"]["points"]] == [8, 16]
    assert set(results["plots"]) == {"nll", "positions", "inference", "niah/inter_hybrid", "niah/hybrid_moe"}
    for name in results["plots"].values():
        assert_nonempty_png(out / name)


def test_a_checkpoint_written_by_two_ranks(corpus, tmp_path):
    """FSDP over 2 gloo ranks wrote the checkpoint in shards; the evaluation loads it whole and its
    NLL equals the validation the two ranks computed together."""
    run = train_tiny(tmp_path / "dp2", corpus, "hybrid_moe", steps=4, nproc=2)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert len(list((run / "checkpoints").glob("step_*/*.distcp"))) == 2  # one shard file per rank
    assert main(["--checkpoint", str(run), "--suite", "nll", "--out", str(tmp_path / "ev"),
                 "--batch-size", str(2 * MICRO_BATCH), "--nll-batches", str(VAL_BATCHES)]) == 0
    nll = json.loads((tmp_path / "ev" / "results.json").read_text())["checkpoints"][0]["nll"]["nll"]
    assert nll == pytest.approx(json.loads((run / "summary.json").read_text())["last_val_nll"], rel=1e-5)


def test_bits_per_byte_count_the_text_bytes(evaluated):
    """Byte tokenizer: every non-special target token is one byte, so bpb = nll x tokens / ln 2 / bytes
    with bytes <= tokens (BOS/EOS targets decode to nothing)."""
    nll = evaluated[1]["checkpoints"][0]["nll"]
    assert nll["tokens"] - 2 * nll["tokens"] // 20 <= nll["bytes"] <= nll["tokens"]
    assert nll["bits_per_byte"] == pytest.approx(nll["nll"] * nll["tokens"] / math.log(2) / nll["bytes"])


def test_compare_joins_suites_per_checkpoint(evaluated, runs, tmp_path):
    out, results = evaluated
    single, link = tmp_path / "single", tmp_path / "link"
    link.symlink_to(runs["inter_hybrid"].parent)  # the same checkpoint under another spelling: still joined
    assert main(["--checkpoint", str(link / runs["inter_hybrid"].name), "--suite", "nll", "--out", str(single),
                 "--nll-batches", "1"]) == 0
    assert main(["compare", str(out), str(single), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text().splitlines()
    assert [line.split(" | ")[0] for line in table if line.startswith("| ") and "pattern" not in line] == \
        ["| inter_hybrid", "| hybrid_moe"]
    cmp = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    later = json.loads((single / "results.json").read_text())["checkpoints"][0]
    inter, moe = cmp["checkpoints"]
    assert inter["nll"] == later["nll"] and inter["positions"] == results["checkpoints"][0]["positions"]
    assert cmp["rows"][0][4] == f"{later['nll']['nll']:.4f}" and cmp["rows"][1][4] == f"{moe['nll']['nll']:.4f}"
    for name in cmp["plots"].values():
        assert_nonempty_png(tmp_path / "cmp" / name)


@pytest.mark.parametrize("args, says", [
    (["--suite", "nll,bogus"], "unknown ['bogus']"),
    (["--niah-depths", "0,1.5"], "--niah-depths"),
    (["--inference-totals", "2"], "must exceed the prompt"),
    (["--niah-lengths", "1,inf"], "must be positive and finite"),
    (["--positions-multiple", "nan"], "must be positive and finite"),
    (["--suite", "fewshot", "--fewshot-tasks", "x", "--fewshot-include", "/no/tasks"], "/no/tasks: not a directory"),
])
def test_bad_options_are_one_line(runs, tmp_path, args, says):
    proc = subprocess.run([sys.executable, "-m", "pretrain.evaluate", "--checkpoint", str(runs["inter_hybrid"]),
                           "--out", str(tmp_path), "--suite", "inference", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert says in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_missing_checkpoint_names_the_path(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "nope") in err and "step_" in err and len(err.strip().splitlines()) == 1


def test_run_names_of_step_and_imported_checkpoints(tmp_path, monkeypatch):
    """A label falls back to the run's name: a step's run directory, or an imported (weights-only)
    checkpoint's own directory, however the path was typed (`imp/hm` has no grandparent name)."""
    from pretrain.evaluation.subject import run_name

    monkeypatch.chdir(tmp_path)
    assert run_name(Path("runs/ih/checkpoints/step_00000002")) == "ih"
    assert run_name(Path("imp/hm")) == "hm" and run_name(Path("hm")) == "hm"


def test_unusable_out_and_data_fail_before_any_model_loads(runs, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    base = ["--checkpoint", str(runs["inter_hybrid"]), "--suite", "nll"]
    assert main([*base, "--out", str(tmp_path / "afile" / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and "cannot create the directory" in err and len(err.strip().splitlines()) == 1
    assert main([*base, "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "no such directory" in err and not (tmp_path / "ev").exists()


@pytest.mark.parametrize("args, says", [
    (["--suite", "nll,inference", "--inference-totals", "2"], "--inference-totals 2: every total length must exceed"),
    (["--suite", "nll,niah", "--niah-lengths", "0.1"], "is shorter than the needle and question"),
    (["--suite", "nll,positions", "--positions-docs", "100000"], "too little data for 100000 windows"),
    (["--suite", "nll,positions", "--positions-multiple", "0.001"], "a window of 0 tokens"),
    (["--suite", "inference,nll", "--batch-size", "100000"], "holds less than one batch of 100000"),
    (["--suite", "nll,inference", "--inference-totals", "8,10000000000000"], "exceed this cpu device's"),
])
def test_a_suite_that_cannot_run_is_refused_before_any_runs(runs, tmp_path, capsys, args, says):
    """Found at start, not after the suites before it ran (their results were lost)."""
    assert main(["--checkpoint", str(runs["inter_hybrid"]), "--out", str(tmp_path / "ev"), "--nll-batches", "1",
                 *args]) == 2
    out, err = capsys.readouterr()
    assert says in err and len(err.strip().splitlines()) == 1, err
    assert "nll ..." not in out and not (tmp_path / "ev" / "results.json").exists()


def _bpe_corpus(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.prepare import PrepareConfig, prepare

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["hello world " * 20, "def f(x): return x"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|bos|>", "<|eos|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    texts = [tmp_path / f"text{i}.txt" for i in range(8)]  # one document each, hash-split train / val
    for i, text in enumerate(texts):
        text.write_text(f"def f{i}(x):\n    return x\n" * 50)
    prepare(PrepareConfig(inputs=[str(t) for t in texts], tokenizer=str(tmp_path / "tokenizer.json"),
                          out=tmp_path / "bpe", val_fraction=0.3, workers=1, input_format="text", progress=False))
    return tmp_path / "bpe"


def test_data_of_another_tokenizer_is_refused(corpus, tmp_path):
    """Evaluating on tokens the model was not trained on: an 8K-vocabulary model on byte data gave a
    plausible but meaningless NLL, a byte model on 8K data an IndexError mid-suite."""
    from types import SimpleNamespace

    from pretrain.evaluation.subject import Subject
    from pretrain.hf import CliError

    bpe = _bpe_corpus(tmp_path)

    def subject(vocab: int, sources: list[str]) -> Subject:
        return Subject(tmp_path / "ckpt", SimpleNamespace(config=SimpleNamespace(vocab_size=vocab)),
                       {"data": {"sources": sources}})

    assert subject(258, [str(corpus)]).checked_data_dir(None) == corpus
    assert subject(258, [str(corpus)]).checked_data_dir(str(corpus)) == corpus
    with pytest.raises(CliError, match=r"--data .*bpe: prepared with another tokenizer \(hf, \d+ ids\) than the run "
                                       r"of .*ckpt \(byte, 258 ids\)"):
        subject(258, [str(corpus)]).checked_data_dir(str(bpe))
    with pytest.raises(CliError, match=r"prepared with another tokenizer"):  # a weighted source of the run
        subject(258, [f"{corpus}:0.5"]).checked_data_dir(str(bpe))
    with pytest.raises(CliError, match=r"--data .*bpe: its tokenizer has \d+ ids but the model embeds 258"):
        subject(258, []).checked_data_dir(str(bpe))  # a weights-only checkpoint: no run data to compare with
    with pytest.raises(CliError, match=r"data.sources\[0\] .*bpe: its tokenizer has \d+ ids but the model embeds 258"):
        subject(258, [str(bpe)]).checked_data_dir(None)


def test_evaluating_again_into_one_out_leaves_no_stale_figure(runs, tmp_path):
    out = tmp_path / "ev"
    base = ["--checkpoint", str(runs["inter_hybrid"]), "--out", str(out), "--nll-batches", "1"]
    assert main([*base, "--suite", "nll"]) == 0 and (out / "nll.png").is_file()
    (out / "notes.png").write_text("mine")  # not a figure results.json listed: left alone
    assert main([*base, "--suite", "positions", "--positions-docs", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["suites"] == ["positions"] and not (out / "nll.png").exists()
    assert (out / "positions.png").is_file() and (out / "notes.png").read_text() == "mine"


@pytest.mark.parametrize("text", ["[]", '{"plan": "x", "fits": {}}', '{"checkpoints": [{"label": "x"}]}'])
def test_compare_of_a_json_that_is_no_results_file_is_one_line(tmp_path, capsys, text):
    (tmp_path / "results.json").write_text(text)
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    err = capsys.readouterr().err
    assert "not the results.json of an evaluation" in err and len(err.strip().splitlines()) == 1


def test_compare_again_into_one_out_leaves_no_stale_figure(tmp_path):
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "results.json").write_text(json.dumps({"checkpoints": [{"label": "a", "checkpoint": "/x/a"}]}))
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "compare.json").write_text(json.dumps({"plots": {"nll": "nll.png"}}))  # an earlier comparison's
    (cmp / "nll.png").write_bytes(b"old")
    assert main(["compare", str(tmp_path / "ev"), "--out", str(cmp)]) == 0
    assert not (cmp / "nll.png").exists() and json.loads((cmp / "compare.json").read_text())["plots"] == {}


def test_compare_labels_checkpoints_of_one_run_name_under_different_parents_apart(tmp_path):
    """expA/llama and expB/llama at the same step: arch, run and step agree, so the labels (which
    key the figures' series) are the paths - one bar each, not one bar overwritten by the other."""
    for exp, nll in (("expA", 5.0), ("expB", 6.0)):
        (tmp_path / exp).mkdir()
        entry = {"label": "llama", "arch": "llama", "checkpoint": f"/x/{exp}/llama/checkpoints/step_00000030",
                 "nll": {"nll": nll, "bits_per_byte": 1.0}}
        (tmp_path / exp / "results.json").write_text(json.dumps({"checkpoints": [entry]}))
    assert main(["compare", str(tmp_path / "expA"), str(tmp_path / "expB"), "--out", str(tmp_path / "cmp")]) == 0
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [r[0] for r in rows] == ["/x/expA/llama/checkpoints/step_00000030", "/x/expB/llama/checkpoints/step_00000030"]
    assert [r[4] for r in rows] == ["5.0000", "6.0000"]


def test_an_evaluation_stopped_midway_keeps_what_it_measured(runs, tmp_path, monkeypatch, capsys):
    """results.json after every suite, `complete` false until the last: a failure in the last suite
    of the last checkpoint no longer costs hours of finished ones; compare reads it and says so."""
    from pretrain.evaluation import runner

    real = runner.run_suites

    def failing(subject, suite, *args):
        if suite == "positions":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return real(subject, suite, *args)

    monkeypatch.setattr(runner, "run_suites", failing)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        main(["--checkpoint", str(runs["inter_hybrid"]), "--suite", "nll,positions", "--nll-batches", "1",
              "--positions-docs", "1", "--out", str(tmp_path / "ev")])
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["complete"] is False and "positions" not in results["checkpoints"][0]
    assert math.isfinite(results["checkpoints"][0]["nll"]["nll"])
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "ev"), "--out", str(tmp_path / "cmp")]) == 0
    assert "stopped midway" in capsys.readouterr().err


def test_a_weights_only_checkpoint_runs_inference_without_data_and_flops_keep_the_runs_length(runs, tmp_path):
    """The inference suite reads no data: a checkpoint without config.toml (an `import`) needs only
    --seq-len. --seq-len rescales the suites, not the FLOPs the run spent (its config's length)."""
    from pretrain.accounting import flops_per_token
    from pretrain.checkpoint import MODEL_CONFIG_FILE, model_config_json, save_model_weights
    from pretrain.hf import load_model, new_dir, publish

    step = sorted((runs["inter_hybrid"] / "checkpoints").glob("step_*"))[-1]
    model = load_model(step)
    weights_only = tmp_path / "imported"
    with new_dir(weights_only) as tmp:  # as `pretrain.hf import` writes one
        save_model_weights(tmp, model.state_dict())
        (tmp / MODEL_CONFIG_FILE).write_text(model_config_json(model.config))
        publish(tmp, weights_only, seal=True)
    small = ["--suite", "inference", "--inference-batch", "1", "--inference-prompt", "4", "--inference-totals", "8"]
    assert main(["--checkpoint", str(weights_only), "--seq-len", "16", *small, "--out", str(tmp_path / "w")]) == 0
    assert main(["--checkpoint", str(step), "--seq-len", str(4 * TRAIN_SEQ_LEN), *small, "--out", str(tmp_path / "s")]) == 0
    entry = json.loads((tmp_path / "s" / "results.json").read_text())["checkpoints"][0]
    assert entry["train_seq_len"] == 4 * TRAIN_SEQ_LEN
    assert entry["flops_per_token"] == flops_per_token(model.config, TRAIN_SEQ_LEN)["total"]


def test_a_relative_source_read_from_elsewhere_says_where_it_is_read_from(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from pretrain.evaluation.subject import Subject
    from pretrain.hf import CliError

    monkeypatch.chdir(tmp_path)
    subject = Subject(tmp_path / "ckpt", SimpleNamespace(config=SimpleNamespace(vocab_size=258)),
                      {"data": {"sources": ["data/demo"]}})
    with pytest.raises(CliError, match=r"data.sources\[0\] data/demo: no such directory here \(.*\); a relative "
                                       r"source is read from the directory the training was launched from"):
        subject.checked_data_dir(None)
