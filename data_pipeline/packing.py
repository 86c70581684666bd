"""Packing documents into windows of seq_len + 1 tokens: [BOS] doc [EOS] [BOS] doc [EOS] ...

Documents cross window boundaries and, by default, attention and the Mamba2 state cross documents
(the paper's recipe). Windows overlap by one token (window n ends with the token window n+1 starts
with), so every token is a prediction target exactly once. `doc_starts` marks BOS positions: with
data.document_masking the model turns them into per-token document ids and positions restarting
at each document (pretrain/model/packed.py), so no document sees another.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from data_pipeline.stream_state import StreamState


class DocumentsExhausted(Exception):
    """A finite document sequence (validation) has no more documents."""


class Documents(Protocol):
    def peek(self) -> tuple[int, np.ndarray]: ...  # (source index, token ids); stable until advance()
    def advance(self) -> None: ...


class Packer:
    """Fills windows from a document sequence; all its position lives in the StreamState."""

    def __init__(self, docs: Documents, state: StreamState, bos_id: int, eos_id: int):
        self.docs, self.st, self.bos, self.eos = docs, state, bos_id, eos_id

    def fill(self, out: np.ndarray, starts: np.ndarray) -> None:
        """Write the next window into `out` (tokens) and `starts` (True at each document's BOS)."""
        st, width = self.st, len(out)
        starts[:] = False
        pos = 0
        if st.carry >= 0:
            out[0], starts[0], pos = st.carry, bool(st.carry_start), 1
        offset = st.offset
        while pos < width:
            k, doc = self.docs.peek()
            rendered = len(doc) + 2  # BOS + doc + EOS
            end = min(rendered, offset + width - pos)
            start_pos = pos
            if offset == 0:
                out[pos], starts[pos] = self.bos, True
                pos += 1
            lo, hi = max(offset, 1) - 1, min(end, rendered - 1) - 1  # doc slice covered
            if hi > lo:
                out[pos:pos + hi - lo] = doc[lo:hi]
                pos += hi - lo
            if end == rendered:
                out[pos] = self.eos
                pos += 1
            st.source_tokens[k] += pos - start_pos
            offset = end
            if offset == rendered:
                self.docs.advance()
                offset = 0
        st.offset = offset
        st.carry, st.carry_start = int(out[-1]), int(starts[-1])
        st.windows += 1
