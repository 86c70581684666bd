"""All resumable state of one canonical stream in one int64 vector.

Keeping it flat makes a snapshot after every window a single `copy()`, cheap enough that the
loader can report the state of exactly the windows it handed out, never the prefetched ones.
"""
from __future__ import annotations

import numpy as np

# dead_streams: (stream, source) pairs given up after many units in a row had no usable document
SKIP_REASONS = ("corrupt_shards", "checksum_mismatch", "empty_docs", "out_of_range_ids", "dead_streams")
_HEAD = ("windows", "offset", "carry", "carry_start", "active", "doc_counter")
_PER_SOURCE = ("epoch", "unit_pos", "doc_pos", "tokens", "docs", "dead")


class StreamState:
    """Named views into the vector: scalars as properties, per-source fields as strided views."""

    def __init__(self, num_sources: int, vector: np.ndarray | None = None):
        self.num_sources = num_sources
        n = len(_HEAD) + len(SKIP_REASONS) + len(_PER_SOURCE) * num_sources
        if vector is None:
            vector = np.zeros(n, np.int64)
            vector[_HEAD.index("carry")] = -1
            vector[_HEAD.index("active")] = -1
        if vector.shape != (n,):
            raise ValueError(f"stream state has {vector.shape} entries, expected {n} for {num_sources} sources")
        self.v = np.array(vector, np.int64)
        per = self.v[len(_HEAD) + len(SKIP_REASONS):].reshape(num_sources, len(_PER_SOURCE))
        self.skips = self.v[len(_HEAD):len(_HEAD) + len(SKIP_REASONS)]
        self.source_tokens = per[:, _PER_SOURCE.index("tokens")]
        self.source_docs = per[:, _PER_SOURCE.index("docs")]
        self.dead = per[:, _PER_SOURCE.index("dead")]  # 1: this stream no longer reads the source
        self._cursors = per[:, :3]

    def cursor(self, k: int) -> tuple[int, int, int]:
        e, u, d = self._cursors[k]
        return int(e), int(u), int(d)

    def set_cursor(self, k: int, epoch: int, unit_pos: int, doc_pos: int) -> None:
        self._cursors[k] = (epoch, unit_pos, doc_pos)

    def count_skip(self, reason: str) -> None:
        self.skips[SKIP_REASONS.index(reason)] += 1

    def snapshot(self) -> np.ndarray:
        return self.v.copy()


def _scalar(i: int) -> property:
    return property(lambda self: int(self.v[i]), lambda self, x: self.v.__setitem__(i, x))


for _i, _name in enumerate(_HEAD):
    setattr(StreamState, _name, _scalar(_i))
