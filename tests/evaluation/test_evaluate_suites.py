"""Each suite against an independent computation: per-position loss from full logits, needles
placed where asked and scored right by an oracle, the live decode cache against accounting."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.manifest import read_manifest
from data_pipeline.tokenizer import ByteTokenizer
from pretrain.evaluation.documents import iter_documents, long_windows
from pretrain.evaluation.inference import run_inference
from pretrain.evaluation.niah import NEEDLE, QUESTION, answer_of, haystack_tokens, make_sample, run_niah
from pretrain.evaluation.positions import run_positions
from pretrain.hf import load_model
from pretrain.model import build_model

CPU, FP32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def model(runs):
    return load_model(sorted((runs["inter_hybrid"] / "checkpoints").glob("step_*"))[-1]).eval()


def test_positions_equal_full_logits_cross_entropy(model, corpus):
    r = run_positions(model, corpus, train_seq_len=40, length=80, docs=2, device=CPU, dtype=FP32)
    windows, source = long_windows(corpus, 80, 2)
    assert source == r["source"] == "documents" and r["length"] == 80
    tokens = torch.from_numpy(windows)
    with torch.no_grad():
        nll = F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:], reduction="none").mean(0)
    want = [float(nll[a:b].mean()) for a, b in zip(r["bin_start"], r["bin_end"])]
    assert r["bin_nll"] == pytest.approx(want, rel=1e-5)
    assert r["nll_within_train_length"] == pytest.approx(float(nll[:40].mean()), rel=1e-5)
    assert r["nll_beyond_train_length"] == pytest.approx(float(nll[40:].mean()), rel=1e-5)


def test_long_windows_are_document_prefixes_or_packed(corpus):
    bos = read_manifest(corpus).bos_id
    docs = list(iter_documents(corpus))
    windows, source = long_windows(corpus, 100, 3)
    assert source == "documents"
    for w in windows:
        assert w[0] == bos and any(len(d) >= 100 and np.array_equal(d[:100], w[1:]) for d in docs)
    # Just longer than the second-longest document: the longest gives one window, the other is packed
    # from the rest in their order (lengths from the data: the stdlib behind it differs by Python version).
    second, longest = sorted(docs, key=len)[-2:]
    length = len(second) + 1
    packed, source = long_windows(corpus, length, 2)
    assert source == "packed" and packed.shape == (2, length + 1)
    assert packed[0, 0] == bos and np.array_equal(packed[0, 1:], longest[:length])
    first = next(d for d in docs if len(d) < length)[:length]
    assert packed[1, 0] == bos and np.array_equal(packed[1, 1:1 + len(first)], first)


def test_windows_beyond_the_long_documents_pack_only_the_others(tmp_path):
    """Two documents as long as a window and short ones: two windows more than the long documents
    give are packed from the short ones - never from a long one a second time."""
    import json

    from data_pipeline.prepare import PrepareConfig, prepare

    texts = [f"long document {i}: " + "x" * 300 for i in range(2)] + [f"short {i} " + "y" * 30 for i in range(30)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    data = tmp_path / "data"
    prepare(PrepareConfig(inputs=[str(tmp_path / "docs.jsonl")], tokenizer="byte", out=data, val_fraction=0.0,
                          workers=1, progress=False))
    heads = [d[:32] for d in iter_documents(data) if len(d) >= 100]
    windows, source = long_windows(data, 100, 4)
    assert len(heads) == 2 and source == "packed" and all(np.array_equal(w[1:33], h) for w, h in zip(windows, heads))
    for w in windows[2:]:
        assert not any(np.array_equal(w[i:i + 32], h) for h in heads for i in range(len(w) - 31))


def test_needle_sits_at_its_depth_in_a_context_of_the_asked_length(corpus):
    tok, rng = ByteTokenizer(), random.Random(0)
    hay = haystack_tokens(corpus, 400)
    for depth in (0.0, 0.3, 1.0):
        s = make_sample(tok, hay, 400, depth, rng)
        city = tok.decode(s.tokens[s.needle_start:].tolist()).split("magic ")[1].split(" number")[0]
        needle = tok.encode(NEEDLE.format(city=city, number=s.number))
        question = tok.encode(QUESTION.format(city=city))
        assert len(s.tokens) == 400 and s.tokens[0] == tok.bos_id and len(s.number) == 7
        assert s.tokens[s.needle_start:s.needle_start + len(needle)].tolist() == needle
        assert s.tokens[-len(question):].tolist() == question
        assert s.needle_start - 1 == round(depth * (400 - 1 - len(needle) - len(question)))


def test_needle_with_a_bpe_tokenizer(corpus, tmp_path):
    """A tokenizer.json (byte-level BPE trained here): the same placement, needle and question whole."""
    from data_pipeline.demo_corpus import stdlib_sources, train_bpe
    from data_pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(train_bpe(stdlib_sources(200_000), 600, tmp_path / "tokenizer.json"))
    hay = np.asarray(tok.encode(" ".join(["the quick brown fox jumps over the lazy dog"] * 60)))
    s = make_sample(tok, hay, 150, 0.5, random.Random(1))
    text = tok.decode(s.tokens[s.needle_start:].tolist())
    assert len(s.tokens) == 150 and s.tokens[0] == tok.bos_id
    assert text.startswith(" The special magic ") and f"number is: {s.number}." in text
    assert text.rstrip().endswith("number is:")


class Oracle(torch.nn.Module):
    """Answers with the number of the needle it finds in the prompt (or a wrong one)."""

    def __init__(self, wrong: bool = False):
        super().__init__()
        self.tok, self.wrong = ByteTokenizer(), wrong

    def generate(self, prompt, max_new_tokens):
        number = answer_of(self.tok.decode(prompt[0].tolist()).split("number is: ")[1])
        said = str(int(number) + 1) if self.wrong else number
        new = torch.tensor([self.tok.encode(" " + said)[:max_new_tokens]])
        return torch.cat([prompt, new], dim=1)


@pytest.mark.parametrize("wrong, accuracy", [(False, 1.0), (True, 0.0)])
def test_niah_scores_the_answer(corpus, wrong, accuracy):
    r = run_niah(Oracle(wrong), corpus, ByteTokenizer(), [200, 300], [0.0, 0.5, 1.0], 2, 0, CPU, FP32)
    assert r["accuracy"] == [[accuracy] * 2] * 3 and r["mean_accuracy"] == accuracy
    assert answer_of(" 1234567.") == "1234567" and answer_of("none") == ""


@pytest.mark.parametrize("arch,dtype", [("llama", FP32), ("mamba2", FP32), ("hybrid_moe", FP32),
                                        ("hybrid_moe", torch.bfloat16)])
def test_decode_cache_matches_accounting(arch, dtype):
    """The live cache holds exactly the bytes `pretrain.accounting.cache_bytes` predicts: K/V and
    conv states at the run's width, SSM states in fp32 (in bf16 runs too)."""
    torch.manual_seed(0)
    m = build_model(arch, "tiny").eval()
    r = run_inference(m, batch=2, prompt_len=4, totals=[12, 6, 20], seed=0, device=CPU, dtype=dtype)
    assert [p["total"] for p in r["points"]] == [6, 12, 20]
    for p in r["points"]:
        assert p["cache_bytes"] == p["cache_bytes_predicted"] > 0
        assert p["tokens_per_s"] > 0 and p["decode_s"] > 0 and p["median_step_tokens_per_s"] > 0
    grows = r["points"][-1]["cache_bytes"] > r["points"][0]["cache_bytes"]
    assert grows == (arch != "mamba2")  # attention keeps every key; Mamba2's state is fixed-size


def test_without_a_validation_split_the_training_split_is_read_and_said(tmp_path, caplog):
    from data_pipeline.prepare import PrepareConfig, prepare
    from pretrain.evaluation.documents import document_split

    texts = [tmp_path / f"t{i}.txt" for i in range(3)]
    for i, t in enumerate(texts):
        t.write_text(f"document {i} " * 40)
    prepare(PrepareConfig([str(t) for t in texts], "byte", tmp_path / "noval", val_fraction=0, workers=1,
                          input_format="text", progress=False))
    with caplog.at_level("WARNING"):
        assert len(list(iter_documents(tmp_path / "noval"))) == len(list(iter_documents(tmp_path / "noval"))) == 3
    assert document_split(tmp_path / "noval") == "train"
    said = [r.getMessage() for r in caplog.records if "has no validation split" in r.getMessage()]
    assert len(said) == 1 and "training split, which the model may have seen" in said[0]


def test_a_damaged_shard_is_skipped_with_a_warning(corpus, tmp_path, caplog):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(corpus, data)
    first = read_manifest(data).split_shards("val")[0]
    whole = list(iter_documents(data))
    (data / first.name).write_bytes(b"\0" * 1024)  # a bad tar header
    with caplog.at_level("WARNING"):
        left = list(iter_documents(data))
    assert len(left) == len(whole) - first.num_docs
    assert any(f"skipped shard {first.name}" in r.getMessage() for r in caplog.records)
