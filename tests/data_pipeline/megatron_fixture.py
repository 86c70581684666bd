"""Write a Megatron indexed dataset (.bin/.idx, MMIDIDX v1) without megatron-core, per the format
megatron/core/datasets/indexed_dataset.py documents: header, version, dtype code, counts, int32
sequence lengths, int64 byte pointers, int64 document indices (starting with 0)."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def write_megatron(prefix: Path, documents: list[list[np.ndarray]], dtype=np.uint16) -> Path:
    code = {np.uint16: 8, np.int32: 4}[dtype]
    lengths, pointers, doc_index, offset = [], [], [0], 0
    with open(f"{prefix}.bin", "wb") as f:
        for doc in documents:
            for seq in doc:
                arr = np.asarray(seq, dtype)
                f.write(arr.tobytes())
                lengths.append(arr.size)
                pointers.append(offset)
                offset += arr.nbytes
            doc_index.append(len(lengths))
    with open(f"{prefix}.idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, len(lengths), len(doc_index)))
        f.write(np.asarray(lengths, np.int32).tobytes() + np.asarray(pointers, np.int64).tobytes())
        f.write(np.asarray(doc_index, np.int64).tobytes())
    return prefix
