"""Mid-run data problems are skipped, counted under a reason, logged with the shard name; the run goes on."""
from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil

import numpy as np

from data_pipeline.loader import build_train_loader, build_val_loader
from data_pipeline.manifest import read_manifest, write_manifest
from data_pipeline.shard_io import ShardWriter, read_shard

SEQ, BATCH, STREAMS = 32, 4, 4


def damaged_copy(src, dst):
    """Copy a prepared dir, then damage three shards and add one holding unusable documents."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    train = m.split_shards("train")
    flipped = bytearray((dst / train[0].name).read_bytes())
    first_token = int(read_shard(dst / train[0].name, m.dtype, train[0]).starts[0]) * 2
    flipped[first_token] ^= 0x01  # a bit flip in a token payload: the tar still parses
    (dst / train[0].name).write_bytes(bytes(flipped))
    (dst / train[1].name).write_bytes((dst / train[1].name).read_bytes()[: train[1].bytes // 2])  # truncated
    (dst / train[2].name).write_bytes(np.random.default_rng(0).bytes(train[2].bytes))  # garbage
    writer = ShardWriter(dst, "99999", "train", m.dtype, 10**9)
    writer.write("99999-000000000", np.array([], np.uint16))  # empty document
    writer.write("99999-000000001", np.array([97, 300, 98], np.uint16))  # 300 >= vocab 258
    writer.write("99999-000000002", np.array([97, 98, 99], np.uint16))  # fine
    writer.close()
    write_manifest(dst, dataclasses.replace(m, shards=m.shards + writer.finished))
    return dst, [s.name for s in train[:3]] + [writer.finished[0].name]


def test_bad_shards_and_documents_are_skipped_and_counted(corpus_a, tmp_path, caplog):
    path, names = damaged_copy(corpus_a, tmp_path / "damaged")
    docs = sum(s.num_docs for s in read_manifest(corpus_a).split_shards("train"))
    loader = build_train_loader([(str(path), 1.0)], SEQ, BATCH, num_streams=STREAMS)
    it = iter(loader)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        while loader.metrics()["docs_read"] < docs:  # one epoch
            batch = next(it)
            assert int(batch["tokens"].max()) < 258
    m = loader.metrics()  # each damage counted once in the epoch (not per retry, nor twice)
    assert m["skipped/checksum_mismatch"] == 1 and m["skipped/corrupt_shards"] == 2
    assert m["skipped/empty_docs"] == 1 and m["skipped/out_of_range_ids"] == 1
    logged = caplog.text
    assert all(name in logged for name in names)


def test_unverified_reads_still_skip_unparseable_shards(corpus_a, tmp_path):
    path, _ = damaged_copy(corpus_a, tmp_path / "damaged")
    loader = build_train_loader([(str(path), 1.0)], SEQ, BATCH, num_streams=STREAMS, verify_checksums=False)
    list(itertools.islice(iter(loader), 200))
    m = loader.metrics()
    assert m["skipped/checksum_mismatch"] == 0 and m["skipped/corrupt_shards"] >= 2


def test_validation_skips_bad_shards(corpus_a, tmp_path):
    path, _ = damaged_copy(corpus_a, tmp_path / "damaged")
    m = read_manifest(path)
    val = m.split_shards("val")
    (path / val[0].name).write_bytes(b"\0" * 10)
    good = len(list(build_val_loader([(str(corpus_a), 1.0)], SEQ, BATCH)))
    assert 0 < len(list(build_val_loader([(str(path), 1.0)], SEQ, BATCH))) < good
