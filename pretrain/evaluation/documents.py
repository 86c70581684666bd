"""Whole documents of a prepared dir in manifest order: what the long-context suites read (the
packed loaders cut documents into training windows; these suites need documents longer than one).

They read the validation split, or where a dir has none (prepared with --val-fraction 0) the
training split, which the model may have seen: said in a warning and in each suite's JSON
(`split`). A damaged shard is skipped with a warning, as the loaders skip it."""
from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.manifest import Manifest, read_manifest
from data_pipeline.shard_io import ShardError, read_shard
from pretrain.hf import CliError

log = logging.getLogger(__name__)


def document_split(data_dir: Path) -> str:
    """The split the suites read: "val", else "train"."""
    return _split_of(read_manifest(data_dir))


def _split_of(manifest: Manifest) -> str:
    return "val" if manifest.split_shards("val") else "train"


@functools.cache
def _warn_training_split(data_dir: Path) -> None:  # once per dir, not per pass over it
    log.warning("%s has no validation split: the long-context suites read the training split, which the model "
                "may have seen (prepare with --val-fraction > 0 for held-out text)", data_dir)


def iter_documents(data_dir: Path) -> Iterator[np.ndarray]:
    """Token arrays (no BOS/EOS) of `document_split`'s split, shard by shard."""
    manifest = read_manifest(data_dir)
    split = _split_of(manifest)
    shards = manifest.split_shards(split)
    if not shards:
        raise CliError(f"{data_dir}: the manifest lists no shards; prepare the data again")
    if split == "train":
        _warn_training_split(data_dir)
    for info in shards:
        try:
            docs = read_shard(data_dir / info.name, manifest.dtype, info)
        except ShardError as exc:
            log.warning("%s: skipped shard %s (%s: %s)", data_dir, info.name, exc.reason, exc)
            continue
        for start, end in zip(docs.starts, docs.ends):
            yield np.asarray(docs.tokens[start:end], dtype=np.int64)


def long_windows(data_dir: Path, length: int, count: int) -> tuple[np.ndarray, str]:
    """`count` windows of BOS + `length` tokens from single documents at least that long; when the
    data has too few, the rest are the other documents packed end to end (EOS, BOS between them),
    which the JSON records as `source: packed` since the per-position loss then mixes document
    starts in."""
    manifest = read_manifest(data_dir)
    bos, eos = manifest.bos_id, manifest.eos_id
    windows = list(itertools.islice((np.concatenate([[bos], d[:length]]) for d in iter_documents(data_dir)
                                     if len(d) >= length), count))
    if len(windows) == count:
        return np.stack(windows), "documents"
    stream: list[int] = []
    for doc in iter_documents(data_dir):
        if len(doc) >= length:  # a window already: every long document is one
            continue
        stream += [bos, *doc.tolist(), eos]
        while len(stream) >= length + 1 and len(windows) < count:
            windows.append(np.asarray(stream[:length + 1]))
            stream = stream[length + 1:]
        if len(windows) == count:
            return np.stack(windows), "packed"
    raise CliError(f"{data_dir}: too little data for {count} windows of {length} tokens; "
                   "lower --positions-docs or --positions-multiple")
