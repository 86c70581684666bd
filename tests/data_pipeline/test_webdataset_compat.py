"""The shards are plain WebDataset: the `webdataset` library alone reads them (no project code)."""
from __future__ import annotations

import json

import numpy as np
import webdataset as wds


def test_webdataset_alone_reads_the_shards(corpus_a):
    manifest = json.loads((corpus_a / "manifest.json").read_text())
    assert set(manifest["sample_keys"]) == {"__key__", "tokens.npy"}
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 258
    urls = [str(corpus_a / s["name"]) for s in manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(samples) == sum(s["num_docs"] for s in manifest["shards"])
    assert sum(len(s["tokens.npy"]) for s in samples) == sum(s["num_tokens"] for s in manifest["shards"])
    first = samples[0]["tokens.npy"]
    assert isinstance(first, np.ndarray) and first.dtype == np.uint16 and first.ndim == 1
    assert bytes(first.tolist()).decode()[:5].isdigit()  # the fixture's docs start with a 5-digit id
    assert len({s["__key__"] for s in samples}) == len(samples)
