"""prepare's one policy for damaged raw input: a damaged, truncated or empty file (or a bad line) is
skipped, counted by kind and named in the summary and the manifest; truncation is always reported
with the documents kept; --strict makes any skip a one-line error (exit 2). Manifests are type-checked."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_pipeline import inputs as inputs_mod
from data_pipeline import prepare as prepare_mod
from data_pipeline.documents import load_sources
from data_pipeline.errors import DataInputError
from data_pipeline.manifest import MANIFEST_FILE, read_manifest
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.shard_io import read_shard
from data_pipeline.tokenizer import ByteTokenizer

from corpus_helpers import random_docs, write_jsonl
from megatron_fixture import write_megatron

DOCS = random_docs(200, 3, "abcdefgh ", 30)
GOOD = random_docs(20, 4, "xyz ", 20)


def _cfg(inputs, out, **kw):
    kw = {"val_fraction": 0.0, "workers": 1, "progress": False, "shard_tokens": 2000, **kw}
    return PrepareConfig([str(i) for i in inputs], "byte", out, **kw)


def _texts(out) -> list[str]:
    m = read_manifest(out)
    texts = []
    for s in m.shards:
        sd = read_shard(out / s.name, m.dtype, s)
        texts += [ByteTokenizer().decode(sd.tokens[a:b].tolist()) for a, b in zip(sd.starts, sd.ends)]
    return texts


def _jsonl_bytes(docs) -> list[bytes]:
    return [json.dumps({"text": d}).encode() + b"\n" for d in docs]


def _zst_in_blocks(lines: list[bytes]) -> bytes:
    """One zstd frame of many small blocks, so a cut in the middle leaves whole lines before it."""
    c = zstandard.ZstdCompressor().compressobj()
    return b"".join(c.compress(line) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for line in lines) + c.flush()


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _damaged(tmp_path, case):
    """The damaged input for each case, next to a good file so the run has something to keep."""
    if case == "truncated_zst":
        data = _zst_in_blocks(_jsonl_bytes(DOCS))
        return _write(tmp_path / "cut.jsonl.zst", data[: len(data) // 2])
    if case == "truncated_gz":
        data = gzip.compress(b"".join(_jsonl_bytes(DOCS)))
        return _write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2])
    if case == "garbage_gz":
        return _write(tmp_path / "garbage.jsonl.gz", b"<html>502 Bad Gateway</html>\n" * 100)  # a failed download
    if case == "empty_file":
        return _write(tmp_path / "empty.jsonl", b"")
    if case == "non_utf8_line":
        return _write(tmp_path / "latin1.jsonl", b'{"text": "caf\xe9"}\n' + b"".join(_jsonl_bytes(DOCS[:5])))
    raise AssertionError(case)


def _run_cli(args, capsys) -> tuple[int, str, str]:
    try:
        prepare_mod.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# --- each damage, without --strict: skipped (or cut), counted, named; the run goes on -------------

def test_truncated_zst_is_reported_and_documents_before_the_cut_kept(tmp_path, caplog):
    src, good = _damaged(tmp_path, "truncated_zst"), write_jsonl(tmp_path / "good.jsonl", GOOD)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        m = prepare(_cfg([src, good], tmp_path / "out"))
    [entry] = m.skipped_files["truncated_files"]
    kept = entry["docs_kept"]
    assert 0 < kept < len(DOCS) and entry["path"] == str(src)
    assert m.skipped == {"truncated_files": 1}  # the cut last line is not a bad_json record
    assert sorted(_texts(tmp_path / "out")) == sorted(DOCS[:kept] + GOOD)  # exactly the lines before the cut
    assert f"{src}: TRUNCATED after {kept} documents" in caplog.text  # loud, with the count


def test_truncated_gz_is_reported_not_a_traceback(tmp_path, caplog):
    src, good = _damaged(tmp_path, "truncated_gz"), write_jsonl(tmp_path / "good.jsonl", GOOD)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        m = prepare(_cfg([src, good], tmp_path / "out"))
    [entry] = m.skipped_files["truncated_files"]
    assert entry["path"] == str(src) and "gzip stream ends" in entry["problem"]
    assert m.skipped == {"truncated_files": 1}
    assert sorted(_texts(tmp_path / "out")) == sorted(DOCS[:entry["docs_kept"]] + GOOD)
    assert f"{src}: TRUNCATED" in caplog.text


def test_garbage_gz_is_skipped_and_named(tmp_path):
    src, good = _damaged(tmp_path, "garbage_gz"), write_jsonl(tmp_path / "good.jsonl", GOOD)
    m = prepare(_cfg([src, good], tmp_path / "out"))
    assert m.skipped == {"damaged_files": 1}
    assert m.skipped_files == {"damaged_files": [
        {"path": str(src), "problem": "damaged (gzip: Not a gzipped file (b'<h')); skipped, the whole file",
         "docs_kept": 0}]}
    assert sorted(_texts(tmp_path / "out")) == sorted(GOOD)


def test_gz_damaged_mid_stream_is_dropped_whole_not_kept_in_part(tmp_path, monkeypatch, caplog):
    """A flipped byte mid-member is found only once the job has written documents (from this file,
    more than one encode batch, and the one before it): the job starts over without the file, and
    leaves no stray shard."""
    monkeypatch.setattr(inputs_mod, "READ_CHUNK", 256)  # the start-up probe reads no further than this
    data = bytearray(gzip.compress(b"".join(_jsonl_bytes(DOCS * 3))))
    data[len(data) // 2] ^= 0xFF
    src = _write(tmp_path / "b_flipped.jsonl.gz", bytes(data))
    good = write_jsonl(tmp_path / "a_good.jsonl", GOOD)  # first in the job: its shards are written, then redone
    with caplog.at_level("WARNING", logger="data_pipeline"):
        m = prepare(_cfg([src, good], tmp_path / "out", shard_tokens=200))
    assert "found after" in caplog.text and "job 00000 starts over without it" in caplog.text
    assert m.skipped == {"damaged_files": 1}  # no bad_json from the garbage, no document from the file
    [entry] = m.skipped_files["damaged_files"]
    assert entry["path"] == str(src) and entry["docs_kept"] == 0 and "skipped, the whole file" in entry["problem"]
    assert sorted(_texts(tmp_path / "out")) == sorted(GOOD)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar*")) == sorted(s.name for s in m.shards)


def test_a_damaged_file_first_in_its_job_is_dropped_whole_whatever_the_job_grouping(tmp_path):
    """A bad CRC found at the end of a file first in its job, before any of its documents was
    written out (fewer than one encode batch): its documents were kept all the same, so the output
    depended on file order and --job-bytes while the manifest said the file was skipped."""
    data = bytearray(gzip.compress(b"".join(_jsonl_bytes(DOCS[:50]))))
    data[-8] ^= 0xFF  # the gzip trailer's CRC32: found only once the whole member is read
    src = _write(tmp_path / "a_bad.jsonl.gz", bytes(data))
    good = write_jsonl(tmp_path / "b_good.jsonl", GOOD)
    for job_bytes in (1 << 28, 100):  # both files in one job, or one job each
        m = prepare(_cfg([src, good], tmp_path / f"out{job_bytes}", job_bytes=job_bytes))
        assert m.skipped == {"damaged_files": 1} and m.skipped_files["damaged_files"][0]["docs_kept"] == 0
        assert sorted(_texts(tmp_path / f"out{job_bytes}")) == sorted(GOOD), job_bytes


@pytest.mark.parametrize("name", ["empty.jsonl", "empty.jsonl.zst", "empty.txt", "empty.parquet"])
def test_empty_file_is_skipped_and_the_run_goes_on(tmp_path, name):
    src, good = _write(tmp_path / name, b""), write_jsonl(tmp_path / "good.jsonl", GOOD)
    m = prepare(_cfg([src, good], tmp_path / "out"))
    assert m.skipped == {"empty_files": 1}
    assert m.skipped_files == {"empty_files": [
        {"path": str(src), "problem": "empty (0 bytes); skipped", "docs_kept": 0}]}
    assert sorted(_texts(tmp_path / "out")) == sorted(GOOD)


def test_non_utf8_jsonl_line_is_skipped_and_counted_like_txt(tmp_path):
    src = _damaged(tmp_path, "non_utf8_line")  # the bad line is the first: the start-up field check passes it by
    txt = _write(tmp_path / "latin1.txt", "café".encode("latin-1"))
    m = prepare(_cfg([src, txt], tmp_path / "out"))
    assert m.skipped == {"bad_utf8": 2}
    assert sorted(_texts(tmp_path / "out")) == sorted(DOCS[:5])


# --- --strict: each of them is a one-line error naming the file, exit 2 --------------------------

@pytest.mark.parametrize("case", ["truncated_zst", "truncated_gz", "garbage_gz", "empty_file", "non_utf8_line"])
def test_strict_makes_each_skip_a_one_line_error(tmp_path, capsys, case):
    src, good = _damaged(tmp_path, case), write_jsonl(tmp_path / "good.jsonl", GOOD)
    code, out, err = _run_cli(["--input", src, good, "--tokenizer", "byte", "--out", tmp_path / "out",
                               "--workers", "1", "--strict"], capsys)
    assert code == 2 and "Traceback" not in err and not (tmp_path / "out" / MANIFEST_FILE).exists()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.strip().splitlines()[-1]]  # one line, the last (a progress bar may precede it)
    assert errors[0].startswith(f"error: {src}: ") and "--strict" in errors[0] and "fix:" in errors[0]
    assert out == ""


def test_strict_error_from_a_worker_process_is_one_line(tmp_path):
    """Many jobs, pool of 2: the error crosses the process boundary whole (DataInputError pickles)."""
    inputs = [write_jsonl(tmp_path / f"good{i}.jsonl", GOOD) for i in range(3)] + [_damaged(tmp_path, "non_utf8_line")]
    with pytest.raises(DataInputError) as err:
        prepare(_cfg(inputs, tmp_path / "out", workers=2, job_bytes=1, strict=True))
    assert str(err.value).startswith(f"{inputs[-1]}: line 1: not valid UTF-8") and "\n" not in str(err.value)


def test_strict_resume_counts_skips_of_jobs_done_without_it(tmp_path):
    src = _damaged(tmp_path, "non_utf8_line")
    prepare(_cfg([src], tmp_path / "out"))
    with pytest.raises(DataInputError, match=f"^{src}: skipped: .*bad_utf8.*without --strict"):
        prepare(_cfg([src], tmp_path / "out", strict=True))


# --- the summary and the manifest name every skipped file by kind --------------------------------

def test_summary_and_manifest_list_skipped_files_per_kind(tmp_path, capsys):
    cut, garbage, empty = (_damaged(tmp_path, c) for c in ("truncated_zst", "garbage_gz", "empty_file"))
    (tmp_path / "more.jsonl").mkdir()  # a directory the glob matches is read, not taken for a damaged file
    good = write_jsonl(tmp_path / "more.jsonl" / "good.jsonl", GOOD)
    code, out, _ = _run_cli(["--input", tmp_path / "*.json*", "--tokenizer", "byte", "--out", tmp_path / "out",
                             "--workers", "2", "--job-bytes", "1"], capsys)  # also: skips recorded by workers
    assert code == 0
    m = json.loads((tmp_path / "out" / MANIFEST_FILE).read_text())
    listed = {kind: [f["path"] for f in files] for kind, files in m["skipped_files"].items()}
    assert listed == {"empty_files": [str(empty)], "damaged_files": [str(garbage)], "truncated_files": [str(cut)]}
    assert m["skipped"] == {"damaged_files": 1, "empty_files": 1, "truncated_files": 1}
    lines = out.splitlines()
    for kind, path in (("empty_files", empty), ("damaged_files", garbage), ("truncated_files", cut)):
        at = lines.index(f"{kind} (1):")
        assert lines[at + 1].startswith(f"  {path}: ")
    kept = m["skipped_files"]["truncated_files"][0]["docs_kept"]
    assert f"  {cut}: TRUNCATED after {kept} documents" in out
    assert read_manifest(tmp_path / "out").skipped_files == m["skipped_files"]  # round-trips through the reader
    assert str(good) in m["inputs"]


# --- the other formats: a damaged parquet, a truncated Megatron .bin, a cut plain jsonl ------------

def _bad_parquet(tmp_path, how):
    path = tmp_path / f"{how}.parquet"
    pq.write_table(pa.table({"text": DOCS}), path)
    data = path.read_bytes()
    return _write(path, data[: len(data) // 2] if how == "truncated" else np.random.default_rng(1).bytes(len(data)))


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_damaged_parquet_is_a_damaged_file(tmp_path, capsys, how):
    src, good = _bad_parquet(tmp_path, how), write_jsonl(tmp_path / "good.jsonl", GOOD)
    m = prepare(_cfg([src, good], tmp_path / "out"))
    assert m.skipped == {"damaged_files": 1} and m.skipped_files["damaged_files"][0]["path"] == str(src)
    code, _, err = _run_cli(["--input", src, good, "--tokenizer", "byte", "--out", tmp_path / "strict",
                             "--strict"], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {src}: damaged_files")


def test_truncated_megatron_bin_is_a_damaged_file(tmp_path, capsys):
    prefix = write_megatron(tmp_path / "corpus", [[np.array([65, 66, 67])], [np.array([68, 69] * 50)]])
    good = write_megatron(tmp_path / "good", [[np.array([70, 71])]])
    bin_path = tmp_path / "corpus.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:50])
    m = prepare(_cfg([bin_path, tmp_path / "good.idx"], tmp_path / "out"))
    [entry] = m.skipped_files["damaged_files"]
    assert entry["path"] == str(prefix) and "truncated .bin" in entry["problem"]
    assert _texts(tmp_path / "out") == ["FG"]
    code, _, err = _run_cli(["--input", bin_path, f"{good}.bin", "--tokenizer", "byte", "--out", tmp_path / "strict",
                             "--strict"], capsys)
    assert code == 2 and err.strip().splitlines() == [err.strip()] and err.startswith(f"error: {prefix}: damaged_files")


@pytest.mark.parametrize("length", [-1, 10_000])
def test_megatron_index_with_a_sequence_out_of_its_bin_is_a_damaged_file(tmp_path, length):
    """A negative length read "to the end of the .bin" (the rest of the corpus again, as one
    document); one past the end read another's bytes. Only the last sequence's end was checked."""
    from data_pipeline.megatron_indexed import _HEADER_BYTES

    prefix = write_megatron(tmp_path / "corpus", [[np.array([65, 66, 67])], [np.array([68, 69])], [np.array([70])]])
    idx = bytearray((tmp_path / "corpus.idx").read_bytes())
    idx[_HEADER_BYTES + 4:_HEADER_BYTES + 8] = np.int32(length).tobytes()  # the second sequence's length
    (tmp_path / "corpus.idx").write_bytes(bytes(idx))
    good = write_megatron(tmp_path / "good", [[np.array([71, 72])]])
    m = prepare(_cfg([tmp_path / "corpus.idx", f"{good}.idx"], tmp_path / "out"))
    [entry] = m.skipped_files["damaged_files"]
    assert entry["path"] == str(prefix) and ("length -1" in entry["problem"] or "truncated .bin" in entry["problem"])
    assert _texts(tmp_path / "out") == ["GH"]


def test_plain_jsonl_cut_inside_its_last_line_is_truncated(tmp_path):
    data = b"".join(_jsonl_bytes(DOCS[:10]))
    src = _write(tmp_path / "cut.jsonl", data[:-20])
    m = prepare(_cfg([src], tmp_path / "out"))
    assert m.skipped == {"truncated_files": 1} and m.skipped_files["truncated_files"][0]["docs_kept"] == 9
    assert sorted(_texts(tmp_path / "out")) == sorted(DOCS[:9])


# --- manifests are type-checked, every field ------------------------------------------------------

@pytest.mark.parametrize("edit, field", [
    (lambda m: m["shards"][0].update(num_docs="many"), "shards[0].num_docs"),
    (lambda m: m["shards"][1].update(split="test"), "shards[1].split"),
    (lambda m: m["shards"][0].pop("sha256"), "shards[0].sha256"),
    (lambda m: m["tokenizer"].update(vocab_size=258.0), "tokenizer.vocab_size"),
    (lambda m: m.update(val_fraction="0.1"), "val_fraction"),
    (lambda m: m.update(dtype="int8"), "dtype"),
    (lambda m: m.update(skipped={"bad_utf8": "3"}), "skipped.bad_utf8"),
    (lambda m: m.update(inputs="a.jsonl"), "inputs"),
    (lambda m: m.update(skipped_files={"empty_files": [{"path": 1, "problem": "", "docs_kept": 0}]}),
     "skipped_files.empty_files[0].path"),
    (lambda m: m.update(shards={}), "shards"),
    (lambda m: m.update(eos_id=True), "eos_id"),
    (lambda m: m.update(sample_keys={"tokens.npy": None}), "sample_keys.tokens.npy"),
    (lambda m: m.update(split_rule=0), "split_rule"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_manifest_field_of_the_wrong_type_is_a_one_line_error(tmp_path, edit, field):
    out = tmp_path / "out"
    prepare(_cfg([write_jsonl(tmp_path / "a.jsonl", DOCS)], out, shard_tokens=300, val_fraction=0.3))
    m = json.loads((out / MANIFEST_FILE).read_text())
    edit(m)
    (out / MANIFEST_FILE).write_text(json.dumps(m))
    for read in (read_manifest, lambda path: load_sources([(str(path), 1.0)])):  # the loader's way in, too
        with pytest.raises(DataInputError) as err:
            read(out)
        msg = str(err.value)
        assert msg.startswith(f"{out / MANIFEST_FILE}: {field}: ") and "\n" not in msg
        assert "fix: correct that field" in msg and "re-run prepare into a fresh --out" in msg


# --- --help ---------------------------------------------------------------------------------------

def test_help_describes_every_option_with_its_default(capsys):
    code, out, _ = _run_cli(["--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    options = ["--input", "--tokenizer", "--out", "--text-field", "--shard-tokens", "--val-fraction", "--workers",
               "--format", "--job-bytes", "--strict"]
    starts = [text.index(f" {o} ", text.index("options:")) for o in options] + [len(text)]
    for option, a, b in zip(options, starts, starts[1:]):
        entry = text[a:b]
        assert "(default: " in entry or "(required)" in entry, entry
        assert len(entry.split()) > 6, entry  # a description, not just the metavar
    assert "(default: 16777216)" in text and "(default: text)" in text and "(default: False)" in text
