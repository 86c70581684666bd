"""prepare: every input format, the split, resume after interruption, and bad input."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import prepare as prepare_mod
from data_pipeline.errors import DataInputError
from data_pipeline.manifest import read_manifest
from data_pipeline.megatron_indexed import _have_megatron_core, iter_megatron_documents
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shard_io import read_shard
from data_pipeline.split import is_validation
from data_pipeline.tokenizer import ByteTokenizer

from corpus_helpers import random_docs, write_jsonl
from megatron_fixture import write_megatron

DOCS = random_docs(40, 7, "abc xyz\n", 30) + ["ünïcödé ☃ text"]


def _cfg(inputs, out, **kw):
    kw = {"val_fraction": 0.0, "workers": 1, "progress": False, "shard_tokens": 300, **kw}
    return PrepareConfig([str(i) for i in inputs], kw.pop("tokenizer", "byte"), out, **kw)


def read_all_docs(out, split=None) -> list[np.ndarray]:
    m = read_manifest(out)
    docs = []
    for s in m.shards:
        if split in (None, s.split):
            sd = read_shard(out / s.name, m.dtype, s)
            docs += [sd.tokens[a:b] for a, b in zip(sd.starts, sd.ends)]
    return docs


def _texts(out, split=None) -> list[str]:
    return sorted(ByteTokenizer().decode(d.tolist()) for d in read_all_docs(out, split))


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt"])
def test_every_text_format_round_trips(tmp_path, fmt):
    if fmt == "txt":
        inputs = []
        for i, d in enumerate(DOCS):
            (tmp_path / f"doc{i:03d}.txt").write_text(d)
            inputs.append(tmp_path / f"doc{i:03d}.txt")
    elif fmt == "parquet":
        inputs = [tmp_path / "a.parquet"]
        pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), inputs[0], row_group_size=7)
    else:
        raw = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
        inputs = [tmp_path / f"a.{fmt}"]
        inputs[0].write_bytes({"jsonl": raw, "jsonl.gz": gzip.compress(raw),
                               "jsonl.zst": zstandard.ZstdCompressor().compress(raw)}[fmt])
    m = prepare(_cfg(inputs, tmp_path / "out"))
    assert _texts(tmp_path / "out") == sorted(DOCS)
    assert m.dtype == "uint16" and sum(s.num_docs for s in m.shards) == len(DOCS)
    assert len(m.shards) > 3  # shard_tokens rolls shards over


MEGATRON_DOCS = [[np.array([5, 6, 7]), np.array([8, 257])], [np.array([1, 2, 3, 4])], [np.array([65, 66, 67, 257])]]


@pytest.mark.parametrize("use_core", [True, False], ids=["megatron-core", "format-reader"])
def test_megatron_readers_agree(tmp_path, use_core):
    if use_core and not _have_megatron_core():
        pytest.fail("megatron-core is not installed: `pip install megatron-core` (the `megatron` extra)")
    prefix = write_megatron(tmp_path / "corpus", MEGATRON_DOCS)
    docs = [d.tolist() for d in iter_megatron_documents(prefix, prefer_megatron_core=use_core)]
    assert docs == [[5, 6, 7, 8, 257], [1, 2, 3, 4], [65, 66, 67, 257]]


def test_megatron_core_written_dataset_converts(tmp_path):
    if not _have_megatron_core():
        pytest.fail("megatron-core is not installed: `pip install megatron-core` (the `megatron` extra)")
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "mc.bin"), dtype=np.uint16)
    for doc in MEGATRON_DOCS + [[np.array([300, 1])]]:  # 300 is out of the byte vocabulary
        builder.add_document(torch.tensor(np.concatenate(doc)), [len(s) for s in doc])
    builder.finalize(str(tmp_path / "mc.idx"))
    m = prepare(_cfg([tmp_path / "mc.bin"], tmp_path / "out"))
    # the trailing EOS (257, Megatron's --append-eod) is stripped: the loader adds its own
    assert sorted(d.tolist() for d in read_all_docs(tmp_path / "out")) == [[1, 2, 3, 4], [5, 6, 7, 8], [65, 66, 67]]
    assert m.skipped == {"out_of_range_ids": 1}


def test_split_is_by_content_hash_and_stable(tmp_path):
    docs = random_docs(300, 3, "abcdef ", 20)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    prepare(_cfg([src], tmp_path / "one", val_fraction=0.2, job_bytes=1 << 30))
    val = _texts(tmp_path / "one", "val")
    assert val == sorted(d for d in docs if is_validation(d, 0.2))
    assert 30 < len(val) < 90 and not set(val) & set(_texts(tmp_path / "one", "train"))
    # other sharding / job layout / workers: same split
    halves = [write_jsonl(tmp_path / "b1.jsonl", docs[::-1][:150]), write_jsonl(tmp_path / "b2.jsonl", docs[::-1][150:])]
    prepare(_cfg(halves, tmp_path / "two", val_fraction=0.2, job_bytes=1, workers=2, shard_tokens=10**6))
    assert _texts(tmp_path / "two", "val") == val


def test_interrupted_prepare_resumes_and_matches_clean_run(tmp_path, monkeypatch):
    inputs = [write_jsonl(tmp_path / f"in{i}.jsonl", random_docs(30, i, "abc ", 40)) for i in range(4)]
    clean = prepare(_cfg(inputs, tmp_path / "clean", job_bytes=1, val_fraction=0.1))

    real_run_job, ran = prepare_mod.run_job, []

    def crashing_run_job(job, cfg, tok):
        if job.index == 2:
            raise KeyboardInterrupt("simulated kill")
        ran.append(job.index)
        return real_run_job(job, cfg, tok)

    monkeypatch.setattr(prepare_mod, "run_job", crashing_run_job)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        prepare(_cfg(inputs, out, job_bytes=1, val_fraction=0.1))
    assert not (out / "manifest.json").exists()  # nothing is listed until every job is done
    (out / "train-00002-0000.tar.tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves

    ran.clear()
    monkeypatch.setattr(prepare_mod, "run_job", lambda job, cfg, tok: ran.append(job.index) or real_run_job(job, cfg, tok))
    resumed = prepare(_cfg(inputs, out, job_bytes=1, val_fraction=0.1))
    assert ran == [2, 3]  # done jobs are skipped
    assert resumed.shards == clean.shards  # same names, counts and checksums
    assert not list(out.glob("*.tmp"))


def test_resume_with_other_options_is_refused(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    prepare(_cfg([src], tmp_path / "out"))
    with pytest.raises(DataInputError, match=r"prepare_settings.json: settings: this --out was prepared with other "
                                             r"--shard-tokens \(300 then, 999 now\); fix: use a fresh --out"):
        prepare(_cfg([src], tmp_path / "out", shard_tokens=999))
    with pytest.raises(DataInputError, match=r"other --input \(files, or their sizes\), --val-fraction \(0"):
        prepare(_cfg([src, write_jsonl(tmp_path / "b.jsonl", DOCS)], tmp_path / "out", val_fraction=0.5))


def test_bad_records_are_skipped_counted_and_logged(tmp_path, caplog):
    lines = [json.dumps({"text": "good one"}).encode(), b'{"text": "bad \xff utf8"}', b"{not json",
             json.dumps({"text": "   "}).encode(), json.dumps({"other": "x"}).encode(),
             b'{"text": "lone \\ud800 surrogate"}', json.dumps({"text": "good two"}).encode()]
    src = tmp_path / "a.jsonl"
    src.write_bytes(b"\n".join([lines[0]] + lines[1:]) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"\xc3\x28 invalid")
    with caplog.at_level("WARNING", logger="data_pipeline"):
        m = prepare(_cfg([src, tmp_path / "bad.txt"], tmp_path / "out"))
    assert f"{src}: skipped documents" in caplog.text and f"{tmp_path / 'bad.txt'}: skipped" in caplog.text
    assert _texts(tmp_path / "out") == ["good one", "good two"]
    assert m.skipped == {"bad_utf8": 3, "bad_json": 1, "empty_docs": 1, "missing_field": 1}


@pytest.mark.parametrize("case", ["missing_path", "empty_glob", "only_empty_files", "unknown_tokenizer",
                                  "jsonl_field", "parquet_field", "unknown_ext", "no_usable_docs", "out_is_a_file",
                                  "zero_workers"])
def test_bad_input_fails_at_start_with_one_line(tmp_path, case):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    inputs, kw = [good], {}
    if case == "missing_path":
        inputs = [tmp_path / "nope.jsonl"]
    elif case == "empty_glob":
        inputs = [tmp_path / "*.parquet"]
    elif case == "only_empty_files":  # one empty file is skipped (test_damaged_inputs.py); all of them is an error
        (tmp_path / "empty.jsonl").write_text("")
        (tmp_path / "empty.txt").write_text("")
        inputs = [tmp_path / "empty.jsonl", tmp_path / "empty.txt"]
    elif case == "unknown_tokenizer":
        kw["tokenizer"] = str(tmp_path / "missing-tokenizer.json")
    elif case == "jsonl_field":
        kw["text_field"] = "content"
    elif case == "parquet_field":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
        inputs = [tmp_path / "a.parquet"]
    elif case == "unknown_ext":
        (tmp_path / "a.csv").write_text("a,b\n")
        inputs = [tmp_path / "a.csv"]
    elif case == "no_usable_docs":
        inputs = [write_jsonl(tmp_path / "blank.jsonl", ["  ", ""])]
    elif case == "out_is_a_file":  # was a NotADirectoryError traceback
        (tmp_path / "out").write_text("")
    elif case == "zero_workers":
        kw["workers"] = 0
    with pytest.raises(DataInputError) as err:
        prepare(_cfg(inputs, tmp_path / "out", **kw))
    msg = str(err.value)
    assert "\n" not in msg and "fix:" in msg and (str(tmp_path) if case != "zero_workers" else "--workers") in msg


def test_cli_reports_bad_input_in_one_line(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", DOCS)
    res = subprocess.run([sys.executable, "-m", "data_pipeline.prepare", "--input", str(src), "--tokenizer", "byte",
                          "--out", str(tmp_path / "out"), "--text-field", "body"], capture_output=True, text=True)
    assert res.returncode != 0
    assert res.stderr.strip().splitlines() == [
        f"error: {src}: --text-field 'body': absent from every record read (line 1's keys: ['text', 'id']); "
        "fix: pass --text-field with one of those keys"]


@pytest.mark.parametrize("flag", ["--out", "--input"])
def test_an_empty_path_is_refused_not_the_current_directory(tmp_path, monkeypatch, flag):
    """`--out ""` wrote shards into the current directory, `--input ""` read it recursively."""
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataInputError, match=f"{flag}: an empty|{flag}: the current directory"):
        prepare(_cfg([good] if flag == "--out" else [""], "" if flag == "--out" else tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl"]


def test_an_out_inside_the_input_directory_resumes_and_one_file_counts_once(tmp_path, monkeypatch):
    """A rerun read the first run's shards and job records as inputs; a file given twice (two
    spellings) was prepared twice."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", DOCS)
    first = prepare(_cfg([data], data / "prepared"))
    again = prepare(_cfg([data], data / "prepared"))  # resumes: same inputs, same manifest
    assert again.digest == first.digest and again.inputs == [str(data / "a.jsonl")]
    monkeypatch.chdir(data)
    twice = prepare(_cfg(["a.jsonl", data / "a.jsonl"], tmp_path / "twice"))
    assert len(read_all_docs(tmp_path / "twice")) == len(DOCS)


def test_a_second_prepare_into_one_out_is_refused_while_the_first_runs(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / prepare_mod.LOCK_FILE, "w") as held:  # what a running prepare holds
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(DataInputError, match="--out: another prepare is writing into this directory"):
            prepare(_cfg([write_jsonl(tmp_path / "a.jsonl", DOCS)], out))
    prepare(_cfg([tmp_path / "a.jsonl"], out))  # released: runs


def test_every_document_in_validation_names_val_fraction(tmp_path):
    with pytest.raises(DataInputError, match=r"--val-fraction: every one of the \d+ usable documents went to the "
                                             r"validation split"):
        prepare(_cfg([write_jsonl(tmp_path / "a.jsonl", DOCS[:3])], tmp_path / "out", val_fraction=0.999999))


def test_workers_die_with_the_prepare_that_started_them(tmp_path):
    """kill -9 of a multi-worker prepare left its workers writing into --out beside the next run."""
    import os
    import signal
    import time

    up = tmp_path / "up"
    worker = (f"import sys, time; from data_pipeline.prepare import _die_with_parent; "
              f"_die_with_parent(int(sys.argv[1])); open({str(up)!r}, 'w').write(str(__import__('os').getpid())); "
              f"time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", "import os, subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {worker!r}, str(os.getpid())]); time.sleep(60)"],
                              cwd=prepare_mod.Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 60
    while not (up.exists() and up.read_text()):
        assert time.monotonic() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(up.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the worker outlived its parent")


def test_a_first_line_that_is_json_but_no_object_is_skipped_like_any_bad_record(tmp_path):
    """`123` on line 1 used to reject the whole file as lacking --text-field."""
    src = tmp_path / "a.jsonl"
    src.write_text("123\n" + "".join(json.dumps({"text": t}) + "\n" for t in ("good one", "good two")))
    m = prepare(_cfg([src], tmp_path / "out"))
    assert _texts(tmp_path / "out") == ["good one", "good two"] and m.skipped == {"missing_field": 1}


def test_an_input_directory_follows_links_and_leaves_out_prepared_outputs_and_hidden_entries(tmp_path, caplog):
    """rglob did not enter linked directories (their documents were lost without a word); an
    earlier prepare into a subdirectory was read back as input (its manifest and shards as text)."""
    top, elsewhere = tmp_path / "top", tmp_path / "elsewhere"
    top.mkdir()
    elsewhere.mkdir()
    write_jsonl(top / "part0.jsonl", DOCS[:10])
    write_jsonl(elsewhere / "part1.jsonl", DOCS[10:20])
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)
    (top / "loop").symlink_to(top, target_is_directory=True)  # read once, not forever
    (top / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    write_jsonl(top / ".hidden.jsonl", ["not a document"])
    prepare(_cfg([top], top / "prep_v1"))
    with caplog.at_level("WARNING", logger="data_pipeline"):
        m = prepare(_cfg([top], top / "prep_v2", tokenizer="byte", shard_tokens=400))  # v1 lies in the input
    assert _texts(top / "prep_v2") == sorted(DOCS[:20])
    assert sorted(m.inputs) == sorted(str(p) for p in (top / "part0.jsonl", top / "linked" / "part1.jsonl"))
    assert "dangling.jsonl: a broken link" in caplog.text and "prep_v1: a prepared output" in caplog.text


def test_a_header_record_without_the_field_is_counted_and_a_text_files_byte_order_mark_dropped(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"id": 0, "meta": "header"}) + "\n" + "".join(json.dumps({"text": d}) + "\n"
                                                                          for d in DOCS[:3]))
    (tmp_path / "b.txt").write_bytes("\ufeffhello text file".encode("utf-8"))
    m = prepare(_cfg([src, tmp_path / "b.txt"], tmp_path / "out"))
    assert m.skipped == {"missing_field": 1} and _texts(tmp_path / "out") == sorted([*DOCS[:3], "hello text file"])


def test_an_empty_validation_split_is_warned_of(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="data_pipeline"):
        prepare(_cfg([write_jsonl(tmp_path / "a.jsonl", DOCS[:20])], tmp_path / "out", val_fraction=0.005))
    assert "the validation split is empty (--val-fraction 0.005 of 20 documents expects 0.1)" in caplog.text


def test_an_input_is_its_literal_path_or_a_megatron_prefix_before_a_glob(tmp_path):
    """`shard[0].jsonl` is a file, not a glob of `shard0.jsonl`; a Megatron dataset given as the
    PREFIX its own error messages ask for is read (both used to be 'matches no file')."""
    write_jsonl(tmp_path / "shard[0].jsonl", DOCS[:5])
    prefix = write_megatron(tmp_path / "corpus", MEGATRON_DOCS)
    prepare(_cfg([tmp_path / "shard[0].jsonl", prefix], tmp_path / "out"))
    got = sorted(d.tolist() for d in read_all_docs(tmp_path / "out"))
    want = sorted([*(list(d.encode()) for d in DOCS[:5]), [1, 2, 3, 4], [5, 6, 7, 8], [65, 66, 67]])
    assert got == want
