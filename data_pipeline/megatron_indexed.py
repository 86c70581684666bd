"""Read Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) document by document.

megatron-core's `IndexedDataset` is used when installed (optional extra `megatron`); otherwise a
reader of the same documented format (MMIDIDX v1: header, dtype code, counts, int32 sequence
lengths, int64 byte pointers, int64 document indices) so a CPU box can convert without it.
"""
from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataInputError

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}
_HEADER_BYTES = 34  # magic (9), version (8), dtype code (1), sequence and document counts (8 + 8)


def megatron_prefix(path: Path) -> Path:
    """`x.bin`, `x.idx` or `x` all name the dataset `x`."""
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def _have_megatron_core() -> bool:
    try:
        with warnings.catch_warnings():  # megatron.core warns about absent GPU extras on import
            warnings.simplefilter("ignore")
            import megatron.core.datasets.indexed_dataset  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class IndexLayout:
    """What an MMIDIDX v1 `.idx` says: the token dtype and the three arrays (views of the file)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32, one per sequence
    sequence_pointers: np.ndarray  # int64 byte offsets into .bin
    document_indices: np.ndarray  # int64, sequence index where each document starts, then n_seq

    @property
    def num_docs(self) -> int:
        return max(len(self.document_indices) - 1, 0)

    @property
    def bin_bytes_needed(self) -> int:
        """The furthest end of a sequence in .bin (every sequence must lie inside it)."""
        if not len(self.sequence_lengths):
            return 0
        step = 1 << 22  # in chunks: an index of 10^8 sequences would need GBs of temporaries at once
        return max(int((self.sequence_pointers[i:i + step] + self.sequence_lengths[i:i + step].astype(np.int64)
                        * self.dtype.itemsize).max()) for i in range(0, len(self.sequence_lengths), step))


def read_index(prefix: Path) -> IndexLayout:
    """Parse and sanity-check `PREFIX.idx`; ValueError saying what is wrong when it is damaged."""
    idx = Path(str(prefix) + ".idx")
    if idx.stat().st_size < _HEADER_BYTES:
        raise ValueError(f"{idx.stat().st_size} bytes, shorter than the {_HEADER_BYTES}-byte header")
    raw = np.memmap(idx, mode="r", dtype=np.uint8)
    if bytes(raw[:9]) != INDEX_HEADER:
        raise ValueError("not a Megatron MMIDIDX index (bad magic)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", bytes(raw[9:_HEADER_BYTES]))
    if version != 1 or code not in DTYPE_CODES:
        raise ValueError(f"version {version}, dtype code {code}: not MMIDIDX version 1")
    need = _HEADER_BYTES + 12 * n_seq + 8 * n_doc
    if raw.size < need:
        raise ValueError(f"{raw.size} bytes, its header promises {need} (a truncated .idx)")
    off = _HEADER_BYTES
    layout = IndexLayout(np.dtype(DTYPE_CODES[code]), np.frombuffer(raw, np.int32, n_seq, off),
                         np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq),
                         np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq))
    doc_idx = layout.document_indices
    if n_doc and (doc_idx[0] != 0 or doc_idx[-1] != n_seq):
        raise ValueError(f"document indices run {doc_idx[0]}..{doc_idx[-1]}, not 0..{n_seq}")
    if n_doc and (np.diff(doc_idx) < 0).any():
        raise ValueError("document indices decrease (a damaged .idx)")
    negative = (layout.sequence_lengths < 0) | (layout.sequence_pointers < 0)
    if negative.any():  # numpy reads a count of -1 as "to the end of the file"
        i = int(np.argmax(negative))
        raise ValueError(f"sequence {i} has length {layout.sequence_lengths[i]} at byte "
                         f"{layout.sequence_pointers[i]} (a damaged .idx)")
    return layout


class _FallbackIndexedDataset:
    """The subset of megatron-core's IndexedDataset that conversion needs, from the file format."""

    def __init__(self, prefix: Path):
        try:
            layout = read_index(prefix)
        except ValueError as exc:
            raise DataInputError(str(prefix) + ".idx", "index", str(exc),
                                 "pass the PREFIX of a Megatron .bin/.idx pair (MMIDIDX version 1)") from None
        self.dtype = layout.dtype
        self.sequence_lengths = layout.sequence_lengths
        self.sequence_pointers = layout.sequence_pointers
        self.document_indices = layout.document_indices
        self._bin = np.memmap(str(prefix) + ".bin", mode="r", dtype=np.uint8)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.frombuffer(self._bin, self.dtype, int(self.sequence_lengths[i]),
                             int(self.sequence_pointers[i]))


def open_indexed_dataset(prefix: Path, prefer_megatron_core: bool = True):
    """megatron-core's IndexedDataset if importable (and preferred), else the format reader."""
    for suffix in (".bin", ".idx"):
        if not Path(str(prefix) + suffix).is_file():
            raise DataInputError(str(prefix) + suffix, "path", "missing half of a Megatron dataset",
                                 "pass a PREFIX with both PREFIX.bin and PREFIX.idx")
    if prefer_megatron_core and _have_megatron_core():
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        return IndexedDataset(str(prefix), mmap=True)
    return _FallbackIndexedDataset(prefix)


def iter_megatron_documents(prefix: Path, prefer_megatron_core: bool = True) -> Iterator[np.ndarray]:
    """Each document as one int64 array: the concatenation of its sequences (e.g. sentences)."""
    ds = open_indexed_dataset(prefix, prefer_megatron_core)
    bounds = ds.document_indices
    for d in range(len(bounds) - 1):
        parts = [ds[i] for i in range(int(bounds[d]), int(bounds[d + 1]))]
        yield np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
