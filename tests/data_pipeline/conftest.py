"""Tiny corpora for the data pipeline tests: byte tokenizer, distinguishable documents, many shards."""
from __future__ import annotations

from pathlib import Path

import pytest

from corpus_helpers import prepare_docs, random_docs


@pytest.fixture(scope="session")
def corpus_a(tmp_path_factory) -> Path:
    """~400 docs of a-m letters, ~24 train shards (fewer than 64 streams: exercises shard parts)."""
    return prepare_docs(tmp_path_factory.mktemp("a"), random_docs(400, 1, "abcdefghijklm \n", 60))


@pytest.fixture(scope="session")
def corpus_b(tmp_path_factory) -> Path:
    """Docs of n-z letters with a different mean length, for mixtures."""
    return prepare_docs(tmp_path_factory.mktemp("b"), random_docs(300, 2, "nopqrstuvwxyz", 150))
