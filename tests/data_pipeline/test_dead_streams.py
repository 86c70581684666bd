"""Units with nothing usable: detected at start where possible; mid-run they never end the run by chance.

A stream moves on to other units (next epoch's) after bad ones; a source in which a stream finds
no usable document over many units in a row is dropped from that stream's mixture (counted in
skipped/dead_streams, logged with shard names); only a stream with no source left is an error.
All of it is a function of the data and the state, so elastic determinism and exact resume hold.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import pickle
import shutil

import numpy as np
import pytest
import torch

from data_pipeline.errors import DataInputError
from data_pipeline.documents import load_sources
from data_pipeline.loader import LoaderConfig, TrainLoader, build_train_loader, build_val_loader
from data_pipeline.manifest import read_manifest, write_manifest

from corpus_helpers import prepare_docs, random_docs
from global_batches import assemble_global_batches

SEQ, BATCH = 32, 4


def take(loader, n):
    return [b["tokens"] for b in itertools.islice(iter(loader), n)]


def small_chunks(src, seq_len, batch, **kw):
    """A train loader whose workers hand over 2K-token chunks: these corpora are mostly garbage to skip."""
    return TrainLoader(load_sources(src), LoaderConfig(seq_len, batch, chunk_tokens=2048, **kw))


def garbage_copy(src, dst, keep_every: int | None = None):
    """Copy a prepared dir; overwrite train shards with same-size garbage (all, or all but every k-th)."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    for i, s in enumerate(m.split_shards("train")):
        if keep_every is None or i % keep_every:
            (dst / s.name).write_bytes(np.random.default_rng(i).bytes(s.bytes))
    return dst


def global_batches(src, dp_size, n, batch, state=None, **kw):
    return assemble_global_batches(lambda r: small_chunks(src, SEQ, batch, dp_rank=r, dp_size=dp_size, **kw),
                                   dp_size, n, state)


def check_elastic_and_resume(src, n, cut, **kw):
    """2 ranks == 1 rank; resuming at `cut` (workers 0 -> 2) == uninterrupted; returns the metrics."""
    ref = global_batches(src, 1, n, 2 * BATCH, **kw)
    assert all(torch.equal(a, b) for a, b in zip(global_batches(src, 2, n, BATCH, **kw), ref))
    first = small_chunks(src, SEQ, 2 * BATCH, **kw)
    take(first, cut)
    resumed = small_chunks(src, SEQ, 2 * BATCH, num_workers=2, **kw)
    resumed.load_state_dict(pickle.loads(pickle.dumps(first.state_dict())))
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, n - cut), ref[cut:]))
    return resumed.metrics()


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """Many small shards, so a stream meets many units; three in four overwritten with garbage."""
    tmp = tmp_path_factory.mktemp("small")
    clean = prepare_docs(tmp / "clean", random_docs(300, 5, "abcdefghijklm \n", 30), shard_tokens=200,
                         val_fraction=0.0)
    return garbage_copy(clean, tmp / "mostly_bad", keep_every=4)


def test_long_runs_of_bad_units_do_not_end_the_run(small_shards):
    src = [(str(small_shards), 1.0)]
    m = check_elastic_and_resume(src, 40, 17, num_streams=16, seed=1)
    assert m["skipped/corrupt_shards"] > 16 and m["skipped/dead_streams"] == 0


def test_a_source_with_nothing_usable_leaves_the_mixture(corpus_a, corpus_b, tmp_path, caplog):
    dead = garbage_copy(corpus_b, tmp_path / "dead_b")
    src = [(str(corpus_a), 0.5), (str(dead), 0.5)]
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        m = check_elastic_and_resume(src, 12, 5, num_streams=4)
    assert m["skipped/dead_streams"] == 4 and m["mixture/1:dead_b/realised"] == 0.0
    assert m["docs_read"] > 0 and m["mixture/0:prepared/realised"] == 1.0
    first_shard = read_manifest(dead).split_shards("train")[0].name
    assert "gave up on this source" in caplog.text and first_shard in caplog.text


def test_a_stream_with_no_usable_source_is_a_one_line_error(corpus_b, tmp_path):
    dead = garbage_copy(corpus_b, tmp_path / "dead_b")
    loader = build_train_loader([(str(dead), 1.0)], SEQ, BATCH, num_streams=4)
    with pytest.raises(DataInputError, match=r"dead_b.*shards.*no usable document.*fix: ") as err:
        next(iter(loader))
    assert "\n" not in str(err.value)


def test_missing_shard_files_are_a_start_error(corpus_a, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(corpus_a / "manifest.json", bare / "manifest.json")
    for build in (build_train_loader, build_val_loader):
        with pytest.raises(DataInputError, match=r"bare: shards: none of the \d+ train shards.*fix: copy"):
            build([(str(bare), 1.0)], SEQ, BATCH)


def test_train_shards_without_documents_are_a_start_error(corpus_a, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(corpus_a, empty)
    m = read_manifest(empty)
    write_manifest(empty, dataclasses.replace(m, shards=[
        dataclasses.replace(s, num_docs=0) if s.split == "train" else s for s in m.shards]))
    with pytest.raises(DataInputError, match=r"manifest.json: shards: no train shard holds a document.*fix: "):
        build_train_loader([(str(empty), 1.0)], SEQ, BATCH)


def test_validation_rejects_a_bad_rank(corpus_a):
    with pytest.raises(DataInputError, match=r"dp_rank/dp_size: rank 2 of 2"):
        build_val_loader([(str(corpus_a), 1.0)], SEQ, BATCH, dp_rank=2, dp_size=2)


def test_a_state_of_another_format_is_a_clear_error(corpus_a):
    loader = build_train_loader([(str(corpus_a), 1.0)], SEQ, BATCH, num_streams=4)
    state = dict(loader.state_dict(), format="data_pipeline.loader/0")
    with pytest.raises(DataInputError, match=r"format: 'data_pipeline.loader/0'.*fix: "):
        loader.load_state_dict(state)


def test_a_small_healthy_source_under_many_streams_is_never_given_up(tmp_path):
    """6 documents in one shard, 256 streams: most of a stream's units (parts of the shard) are empty
    by construction. They counted as units without a usable document, so streams gave the healthy
    source up (an audit's longer run: 82 of 256 streams, its share 0.5 -> 0.42); now none does."""
    big = prepare_docs(tmp_path / "big", random_docs(200, 1, "ab", 40), val_fraction=0.0)
    small = prepare_docs(tmp_path / "small", random_docs(6, 2, "xy", 40), val_fraction=0.0)
    loader = build_train_loader([(str(big), 1.0), (str(small), 1.0)], 15, 256, num_streams=256)
    take(loader, 3)
    m = loader.metrics()
    assert m["skipped/dead_streams"] == 0
    assert abs(m["mixture/1:prepared/realised"] - 0.5) < 0.1, m
