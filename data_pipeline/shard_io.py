"""Writing and reading the tokenized WebDataset shards.

Writing goes through `webdataset.TarWriter` (one `tokens.npy` per document) into `NAME.tmp`, which
is renamed only when the shard is complete. Reading memory-maps the tar and indexes member
offsets, so documents are zero-copy numpy views and the page cache, not the process, holds shard
bytes: 64 streams can each hold a shard without 64 shards of RSS. The index walks the 512-byte
ustar headers our writer produces directly (checksums verified), several times faster than the
stdlib `tarfile`, which still reads any archive with other member kinds (pax, GNU long names).
"""
from __future__ import annotations

import hashlib
import io
import mmap
import os
import re
import tarfile
from dataclasses import astuple, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.manifest import TOKENS_KEY, ShardInfo


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_OCTAL = re.compile(rb"[0-7]+")
_NPY_V1_HEADER = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '([<>|][a-z][0-9])', 'fortran_order': False, 'shape': \((\d+),\), \}", re.S)


class ShardWriter:
    """Rolls over to a new shard every `shard_tokens` tokens; returns a ShardInfo per finished shard."""

    def __init__(self, out_dir: Path, prefix: str, split: str, dtype: str, shard_tokens: int):
        self.out_dir, self.prefix, self.split = Path(out_dir), prefix, split
        self.dtype, self.shard_tokens = np.dtype(dtype), shard_tokens
        self.finished: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._docs = self._tokens = 0

    def write(self, key: str, tokens: np.ndarray) -> None:
        if self._tar is None:
            name = f"{self.split}-{self.prefix}-{len(self.finished):04d}.tar"
            self._path = self.out_dir / name
            self._file = open(self._path.with_name(name + ".tmp"), "wb")
            # mtime=0 and fixed owner make the bytes (hence checksums) reproducible across runs.
            self._tar = wds.TarWriter(self._file, mtime=0)
        self._tar.write({"__key__": key, TOKENS_KEY: np.ascontiguousarray(tokens, dtype=self.dtype)})
        self._docs += 1
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self.close()

    def close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        tmp = self._path.with_name(self._path.name + ".tmp")
        self.finished.append(ShardInfo(self._path.name, self.split, self._docs, self._tokens,
                                       tmp.stat().st_size, file_sha256(tmp)))
        os.replace(tmp, self._path)
        self._tar, self._docs, self._tokens = None, 0, 0


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardError(Exception):
    """A shard that cannot be used; `reason` is the metric it is counted under."""

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        super().__init__(detail)


@dataclass
class ShardDocs:
    """Documents of one shard as views into its memory map: doc i is tokens[starts[i]:ends[i]]."""

    tokens: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    def __len__(self) -> int:
        return len(self.starts)


def read_shard(path: Path, dtype: str, info: ShardInfo | None = None, verify: bool = True) -> ShardDocs:
    """Index a shard; raises ShardError('checksum_mismatch' | 'corrupt_shards') if unusable.

    With the manifest's `info`, a size or document count that differs is corruption (a truncated
    tar can parse cleanly), and with `verify` a sha256 that differs is a checksum mismatch.
    A shard is reopened by every stream that reads a part of it and again each epoch: the index
    and verdict of the last few shards are kept per process, keyed by the file's identity (device,
    inode, size, mtime, ctime: `cp -p` keeps mtime, not ctime), so each is hashed and indexed once
    and a replaced or rewritten file is checked again.
    """
    try:
        stat = os.stat(path)
    except OSError:
        return _index_shard(path, dtype, info, verify)  # raises: missing
    fields = None if info is None else astuple(info)
    identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    return _cached_shard(str(path), identity, dtype, fields, verify)


@lru_cache(maxsize=16)
def _cached_shard(path: str, _identity: tuple[int, ...], dtype: str, info_fields: tuple | None,
                  verify: bool) -> ShardDocs:
    return _index_shard(Path(path), dtype, ShardInfo(*info_fields) if info_fields else None, verify)


def _index_shard(path: Path, dtype: str, info: ShardInfo | None, verify: bool) -> ShardDocs:
    dt = np.dtype(dtype)
    if info is not None and path.is_file() and path.stat().st_size != info.bytes:
        raise ShardError("corrupt_shards", f"{path}: {path.stat().st_size} bytes, manifest says {info.bytes}")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as exc:  # missing or empty file
        raise ShardError("corrupt_shards", f"{path}: cannot map ({exc})") from None
    starts, ends = [], []
    try:
        for name, offset, size in _tar_members(mm, path):
            if not name.endswith("." + TOKENS_KEY):
                continue
            header_len, count = _npy_layout(mm, offset, size, dt)
            start = (offset + header_len) // dt.itemsize
            starts.append(start)
            ends.append(start + count)
    except (tarfile.TarError, ValueError, EOFError) as exc:
        raise ShardError("corrupt_shards", f"{path}: unreadable tar ({exc})") from None
    if info is not None and len(starts) != info.num_docs:
        raise ShardError("corrupt_shards", f"{path}: {len(starts)} documents, manifest says {info.num_docs}")
    if info is not None and verify and hashlib.sha256(mm).hexdigest() != info.sha256:
        raise ShardError("checksum_mismatch", f"{path}: sha256 differs from the manifest")
    tokens = np.frombuffer(mm, dtype=dt, count=len(mm) // dt.itemsize)
    return ShardDocs(tokens, np.asarray(starts, np.int64), np.asarray(ends, np.int64))


def _tar_members(mm: mmap.mmap, path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every member, in order."""
    members = _ustar_members(mm)
    if members is None:
        with tarfile.open(path, mode="r:") as tar:
            members = [(m.name, m.offset_data, m.size) for m in tar]
    return members


def _ustar_members(mm: mmap.mmap) -> list[tuple[str, int, int]] | None:
    """Members of a tar of plain ustar file headers, or None if it has any other kind of header
    (the caller then asks `tarfile`). Raises ValueError on a bad checksum or a truncated member."""
    members, offset = [], 0
    while offset + _BLOCK <= len(mm):
        header = mm[offset:offset + _BLOCK]
        if header == _ZERO_BLOCK:
            break  # end-of-archive marker
        if header[156:157] not in (b"0", b"\0") or header[124] & 0x80:  # not a regular file, or base-256 size
            return None
        stored, unsigned = _octal(header[148:156], offset), sum(header) - sum(header[148:156]) + 8 * 0x20
        if stored != unsigned and stored != unsigned - 256 * sum(b >= 0x80 for b in header[:148] + header[156:]):
            raise ValueError(f"header at {offset}: bad checksum")  # neither the unsigned nor the signed sum
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        size = _octal(header[124:136], offset)
        if offset + _BLOCK + size > len(mm):
            raise ValueError(f"member at {offset}: truncated ({size} bytes announced)")
        members.append((name.decode(errors="surrogateescape"), offset + _BLOCK, size))
        offset += _BLOCK + -(-size // _BLOCK) * _BLOCK
    return members


def _octal(field: bytes, offset: int) -> int:
    """A numeric header field as tarfile reads it (up to the first NUL, spaces stripped), but
    digits only: a sign would let a crafted size walk backwards or stand still."""
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if digits and not _OCTAL.fullmatch(digits):
        raise ValueError(f"header at {offset}: bad number field {field!r}")
    return int(digits or b"0", 8)


def _npy_layout(buf: mmap.mmap, offset: int, size: int, dt: np.dtype) -> tuple[int, int]:
    """(header length, element count) of an .npy member, checked against the manifest dtype."""
    if offset + size > len(buf):
        raise ValueError(f"member at {offset}: truncated ({size} bytes announced)")
    head = buf[offset:offset + min(size, 128)]
    fast = _NPY_V1_HEADER.match(head)
    if fast and fast.group(1).decode() == dt.str:  # the exact header our writer produces: skip the slow parser
        header_len, count = 10 + int.from_bytes(head[8:10], "little"), int(fast.group(2))
    else:
        header = io.BytesIO(buf[offset:offset + min(size, 4096)])
        header_len, count = _npy_layout_generic(header, offset, dt)
    if header_len + count * dt.itemsize != size or (offset + header_len) % dt.itemsize:
        raise ValueError(f"member at {offset}: size {size} does not match its .npy header")
    return header_len, count


def _npy_layout_generic(header: io.BytesIO, offset: int, dt: np.dtype) -> tuple[int, int]:
    version = np.lib.format.read_magic(header)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, descr = read_header(header)
    if np.dtype(descr) != dt or len(shape) != 1:
        raise ValueError(f"member at {offset}: dtype {descr} shape {shape}, expected 1-D {dt}")
    return header.tell(), shape[0]
