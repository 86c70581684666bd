"""The lm-eval adapter: loglikelihoods and greedy generations equal our model's own forward and
`generate`, and a small local lm-eval task (no download) scores through `simple_evaluate`, through
`python -m pretrain.evaluate --suite fewshot` (an unknown task name stops it at start) and through the
harness's CLI with `--model ours`."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from eval_helpers import REPO

from data_pipeline.tokenizer import ByteTokenizer
from pretrain.evaluation.fewshot import Scorer
from pretrain.hf import load_model
from pretrain.model.lm import STOP_EVERY

DOCS = [{"question": "def main(", "choices": [")", "x", "]]"], "answer": 0},
        {"question": "import o", "choices": ["s", "q", "zz"], "answer": 0},
        {"question": "return No", "choices": ["ne", "pe", "xx"], "answer": 0},
        {"question": "for i in ran", "choices": ["ge(", "dom", "k"], "answer": 1},
        {"question": "class Fo", "choices": ["o:", "q!", "zz"], "answer": 2},
        {"question": "self.", "choices": ["_x", "assert", "9"], "answer": 1}]
TASK_YAML = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def scorer(runs):
    model = load_model(sorted((runs["inter_hybrid"] / "checkpoints").glob("step_*"))[-1]).eval()
    return Scorer(model, ByteTokenizer(), max_length=64, batch_size=3)


def reference_loglikelihood(model, tokens: list[int], n_cont: int) -> tuple[float, bool]:
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0, -n_cont:]
    target = torch.tensor(tokens[-n_cont:])
    return float(F.log_softmax(logits, -1).gather(1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all())


def test_loglikelihood_equals_the_full_forward(scorer):
    requests = [("def f(x):", " return x"), ("import", " os"), ("a" * 80, " b"), ("x = ", "1"), ("if ", "True:"),
                ("x = 1\n\n", "y = 2"), ("a = 1\t", "b")]
    got = scorer.loglikelihood(requests)
    bos = scorer.tok.bos_id
    for (ctx, cont), (logp, greedy) in zip(requests, got):
        moved = ctx[len(ctx.rstrip()):]  # trailing whitespace of the context belongs to the continuation (as HF's)
        tokens = [bos, *ctx.rstrip().encode(), *(moved + cont).encode()][-65:]  # kept: the last 64 inputs + 1
        want = reference_loglikelihood(scorer.model, tokens, len((moved + cont).encode()))
        assert logp == pytest.approx(want[0], rel=1e-4, abs=1e-4) and greedy == want[1]


class MergingTokenizer(ByteTokenizer):
    """Bytes, but "ab" is one token (id 200): a merge that can cross a context/continuation boundary."""

    def encode(self, text: str) -> list[int]:
        return [t for part in text.split("ab") for t in (*part.encode(), 200)][:-1]


def test_a_merge_across_the_boundary_and_an_empty_continuation(scorer):
    merging = Scorer(scorer.model, MergingTokenizer(), max_length=64)
    bos = merging.tok.bos_id
    assert merging.encode_pair("xab", "cd") == ([bos, ord("x"), 200], [ord("c"), ord("d")])  # split of the whole
    assert merging.encode_pair("xa", "b") == ([bos, ord("x"), ord("a")], [ord("b")])  # "ab" merged across: apart
    (logp, greedy), = merging.loglikelihood([("xa", "b")])
    assert logp == pytest.approx(reference_loglikelihood(scorer.model, [bos, ord("x"), ord("a"), ord("b")], 1)[0],
                                 rel=1e-4) and logp < 0
    assert merging.loglikelihood([("xa", "")]) == [(0.0, True)]


@pytest.mark.parametrize("length", [26, 150])
def test_rolling_loglikelihood_is_the_whole_texts(scorer, length):
    """Every token scored once; a span past the first max_length tokens sees as many tokens before
    it as fit in max_length (lm-eval's windows: the last, partial one too)."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    text = ("def main():\n    return 0\n" * 6)[:length]
    tokens = [scorer.tok.bos_id, *text.encode()]
    want = sum(reference_loglikelihood(scorer.model, tokens[:end + 1][-65:], end - start)[0]
               for start, end in ((s, min(s + 64, length)) for s in range(0, length, 64)))
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(want, rel=1e-4)


def test_generation_is_greedy_and_stops_at_until_or_eos(scorer, capsys):
    prompt = "def main():\n    "
    full = scorer.model.generate(torch.tensor([[scorer.tok.bos_id, *prompt.encode()]]), max_new_tokens=12)
    new = full[0, len(prompt) + 1:].tolist()
    text = scorer.tok.decode(new)
    assert scorer.generate_until(prompt, [], 12) == text
    stop = text[3:5]
    assert scorer.generate_until(prompt, [stop], 12) == text[:text.index(stop)]

    class EndsAt(ByteTokenizer):  # the token the model makes 4th is this tokenizer's EOS
        eos_id = new[3]

    cut = new.index(EndsAt.eos_id)
    assert Scorer(scorer.model, EndsAt(), max_length=64).generate_until(prompt, [], 12) == text[:cut] != text

    made = []  # a stop string or EOS ends the generation at the next check, not at max_new_tokens
    generate = scorer.model.generate
    scorer.model.generate = lambda *a, **kw: made.append(generate(*a, **kw)) or made[-1]
    try:
        assert scorer.generate_until(prompt, [stop], 40) == text[:text.index(stop)]
        assert Scorer(scorer.model, EndsAt(), max_length=64).generate_until(prompt, [], 40) == text[:cut]
    finally:
        del scorer.model.generate
    assert [m.shape[1] - len(prompt) - 1 for m in made] == [STOP_EVERY, STOP_EVERY]

    long_prompt = "x = 1\n" * 20  # 121 tokens with BOS; 64 new tokens leave no room within max_length 64
    ids = [scorer.tok.bos_id, *long_prompt.encode()][-64:]
    want = scorer.tok.decode(scorer.model.generate(torch.tensor([ids]), max_new_tokens=64)[0, 64:].tolist())
    capsys.readouterr()
    assert scorer.generate_until(long_prompt, [], 64) == want
    assert "max_gen_toks 64 >= the model's max_length 64: contexts keep their last 64 tokens" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    root = tmp_path_factory.mktemp("tasks")
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tiny_choice.yaml").write_text(TASK_YAML.format(data=root / "docs.jsonl"))
    return root


def expected_accuracy(scorer) -> float:
    right = 0
    for doc in DOCS:
        scores = [lp for lp, _ in scorer.loglikelihood([(doc["question"], " " + c) for c in doc["choices"]])]
        right += max(range(len(scores)), key=scores.__getitem__) == doc["answer"]
    return right / len(DOCS)


def test_local_task_through_the_harness(scorer, local_task, runs, tmp_path, monkeypatch, capsys):
    from pretrain.evaluate import main
    from pretrain.evaluation.harness import evaluate_tasks

    for offline in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):  # proves no download happens
        monkeypatch.setenv(offline, "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    want = expected_accuracy(scorer)
    result = evaluate_tasks(scorer, ["tiny_choice"], None, str(local_task))
    assert result["tasks"]["tiny_choice"]["acc"] == pytest.approx(want) and result["average"] == pytest.approx(want)

    assert main(["--checkpoint", str(runs["inter_hybrid"]), "--suite", "fewshot", "--fewshot-tasks", "tiny_choice",
                 "--fewshot-include", str(local_task), "--out", str(tmp_path / "ev")]) == 0
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())["checkpoints"][0]["fewshot"]
    assert saved["average"] == pytest.approx(want)
    capsys.readouterr()
    assert main(["--checkpoint", str(runs["inter_hybrid"]), "--suite", "nll,fewshot", "--fewshot-tasks", "tiny_choise",
                 "--fewshot-include", str(local_task), "--out", str(tmp_path / "typo")]) == 2  # before any suite runs
    err = capsys.readouterr().err
    assert "tiny_choise is not an lm-eval task" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "typo").exists()

    proc = subprocess.run([sys.executable, "-m", "pretrain.evaluation.harness", "--model", "ours", "--model_args",
                           f"checkpoint={runs['inter_hybrid']}", "--tasks", "tiny_choice", "--include_path",
                           str(local_task), "--output_path", str(tmp_path / "h")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = json.loads(next((tmp_path / "h").rglob("results*.json")).read_text())
    assert written["results"]["tiny_choice"]["acc,none"] == pytest.approx(want)


def test_metric_names_keep_their_filter():
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    from pretrain.evaluation.harness import metric_name

    assert metric_name("acc,none") == "acc" and metric_name("acc_norm") == "acc_norm"
    assert metric_name("exact_match,strict-match") != metric_name("exact_match,flexible-extract")


def test_a_groups_row_is_not_averaged_again(scorer, tmp_path):
    """lm-eval reports a group (here weighted by size) beside its tasks: the average is over the
    tasks alone. The model's own choices make one task all right (6 docs), the other all wrong (3)."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    from pretrain.evaluation.harness import evaluate_tasks

    def choice(doc):
        scores = [lp for lp, _ in scorer.loglikelihood([(doc["question"], " " + c) for c in doc["choices"]])]
        return max(range(len(scores)), key=scores.__getitem__)

    include = tmp_path / "tasks"
    include.mkdir()
    for name, docs in (("all_right", [{**d, "answer": choice(d)} for d in DOCS]),
                       ("all_wrong", [{**d, "answer": (choice(d) + 1) % 3} for d in DOCS[:3]])):
        (include / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
        (include / f"{name}.yaml").write_text(TASK_YAML.format(data=include / f"{name}.jsonl").replace("tiny_choice", name))
    (include / "group.yaml").write_text("group: both\ntask:\n  - all_right\n  - all_wrong\naggregate_metric_list:\n"
                                        "  - metric: acc\n    weight_by_size: true\n")
    result = evaluate_tasks(scorer, ["both"], None, str(include))
    assert (result["tasks"]["all_right"]["acc"], result["tasks"]["all_wrong"]["acc"]) == (1.0, 0.0)
    assert result["tasks"]["both"]["acc"] == pytest.approx(6 / 9) and result["average"] == pytest.approx(0.5)


def test_harness_dtypes_take_torch_names_and_refuse_others(runs):
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    from pretrain.evaluation.harness import scorer_for
    from pretrain.hf import CliError

    assert scorer_for(str(runs["inter_hybrid"]), None, "bfloat16", None, 8, "cpu").dtype == torch.bfloat16
    with pytest.raises(CliError, match="dtype=float16: not one of auto, bf16, bfloat16, fp32, float32"):
        scorer_for(str(runs["inter_hybrid"]), None, "float16", None, 8, "cpu")


def test_harness_data_must_be_the_runs_tokens(runs, tmp_path):
    """data= of another tokenizer scored every choice on the wrong tokens (acc 0 instead of 0.625);
    a missing dir was a traceback. Both are one-line errors, as in `pretrain.evaluate`."""
    pytest.importorskip("lm_eval", reason="lm-eval is the optional 'eval' extra")
    from test_evaluate_cli import _bpe_corpus

    from pretrain.evaluation.harness import scorer_for
    from pretrain.hf import CliError

    with pytest.raises(CliError, match=r"--data .*bpe: prepared with another tokenizer \(hf, \d+ ids\)"):
        scorer_for(str(runs["inter_hybrid"]), str(_bpe_corpus(tmp_path)), "auto", None, 8, "cpu")
    with pytest.raises(CliError, match=r"--data /no/data: .*manifest"):
        scorer_for(str(runs["inter_hybrid"]), "/no/data", "auto", None, 8, "cpu")
