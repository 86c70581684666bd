"""Whole documents of a prepared dir in manifest order: what the long-context suites read (the
packed loaders cut documents into training windows; these suites need documents longer than one)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.manifest import read_manifest
from data_pipeline.shard_io import read_shard
from pretrain.hf import CliError


def iter_documents(data_dir: Path, split: str = "val") -> Iterator[np.ndarray]:
    """Token arrays (no BOS/EOS) of `split`, shard by shard; the train split when `split` has none."""
    manifest = read_manifest(data_dir)
    shards = manifest.split_shards(split) or manifest.split_shards("train")
    if not shards:
        raise CliError(f"{data_dir}: the manifest lists no shards; prepare the data again")
    for info in shards:
        docs = read_shard(data_dir / info.name, manifest.dtype, info)
        for start, end in zip(docs.starts, docs.ends):
            yield np.asarray(docs.tokens[start:end], dtype=np.int64)


def long_windows(data_dir: Path, length: int, count: int) -> tuple[np.ndarray, str]:
    """`count` windows of BOS + `length` tokens from single documents at least that long; when the
    data has too few, the rest are the other documents packed end to end (EOS, BOS between them),
    which the JSON records as `source: packed` since the per-position loss then mixes document
    starts in."""
    manifest = read_manifest(data_dir)
    bos, eos = manifest.bos_id, manifest.eos_id
    windows = [np.concatenate([[bos], d[:length]]) for d in iter_documents(data_dir) if len(d) >= length][:count]
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
