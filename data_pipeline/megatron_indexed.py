"""Read Megatron indexed datasets (`PREFIX.bin` + `PREFIX.idx`) document by document.

megatron-core's `IndexedDataset` is used when installed (optional extra `megatron`); otherwise a
reader of the same documented format (MMIDIDX v1: header, dtype code, counts, int32 sequence
lengths, int64 byte pointers, int64 document indices) so a CPU box can convert without it.
"""
from __future__ import annotations

import struct
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataInputError

INDEX_HEADER = b"MMIDIDX\x00\x00"
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
               7: np.float32, 8: np.uint16}


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


class _FallbackIndexedDataset:
    """The subset of megatron-core's IndexedDataset that conversion needs, from the file format."""

    def __init__(self, prefix: Path):
        idx = Path(str(prefix) + ".idx")
        raw = np.memmap(idx, mode="r", dtype=np.uint8)
        if bytes(raw[:9]) != INDEX_HEADER:
            raise DataInputError(idx, "header", "not a Megatron MMIDIDX index",
                                 "pass the PREFIX of a Megatron .bin/.idx pair")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", bytes(raw[9:34]))
        if version != 1 or code not in DTYPE_CODES:
            raise DataInputError(idx, "version/dtype", f"version {version}, dtype code {code}",
                                 "re-export with Megatron's IndexedDatasetBuilder (version 1)")
        self.dtype = np.dtype(DTYPE_CODES[code])
        off = 34
        self.sequence_lengths = np.frombuffer(raw, np.int32, n_seq, off)
        self.sequence_pointers = np.frombuffer(raw, np.int64, n_seq, off + 4 * n_seq)
        self.document_indices = np.frombuffer(raw, np.int64, n_doc, off + 12 * n_seq)
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
