"""Train/validation split by a hash of each document's content.

Hashing content (not position) keeps the split stable when inputs are reordered, re-sharded or
re-run with more workers, and sends exact duplicates to the same side, so they never leak across.
"""
from __future__ import annotations

import hashlib

import numpy as np


def document_bytes(doc: str | np.ndarray) -> bytes:
    return doc.encode("utf-8") if isinstance(doc, str) else np.asarray(doc, "<i8").tobytes()


def is_validation(doc: str | np.ndarray, val_fraction: float) -> bool:
    digest = hashlib.blake2b(document_bytes(doc), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64
