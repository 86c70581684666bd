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
    requests = [("def f(x):", " return x"), ("import", " os"), ("a" * 80, " b"), ("x = ", "1"), ("if ", "True:")]
    got = scorer.loglikelihood(requests)
    bos = scorer.tok.bos_id
    for (ctx, cont), (logp, greedy) in zip(requests, got):
        moved = ctx[len(ctx.rstrip(" ")):]  # trailing spaces of the context belong to the continuation
        tokens = [bos, *ctx.rstrip(" ").encode(), *(moved + cont).encode()][-65:]  # kept: the last 64 inputs + 1
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


def test_rolling_loglikelihood_is_the_whole_texts(scorer):
    text = "def main():\n    return 0\n"
    tokens = [scorer.tok.bos_id, *text.encode()]
    assert scorer.loglikelihood_rolling([text])[0] == pytest.approx(
        reference_loglikelihood(scorer.model, tokens, len(tokens) - 1)[0], rel=1e-4)


def test_generation_is_greedy_and_stops_at_until(scorer):
    prompt = "def main():\n    "
    full = scorer.model.generate(torch.tensor([[scorer.tok.bos_id, *prompt.encode()]]), max_new_tokens=12)
    text = scorer.tok.decode(full[0, len(prompt) + 1:].tolist())
    assert scorer.generate_until(prompt, [], 12) == text
    stop = text[3:5]
    assert scorer.generate_until(prompt, [stop], 12) == text[:text.index(stop)]


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
