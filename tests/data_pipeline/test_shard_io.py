"""The shard index: the direct ustar-header walk agrees with the stdlib `tarfile`, archives with
other header kinds still read (through `tarfile`), and a damaged header is corruption."""
from __future__ import annotations

import io
import mmap
import tarfile

import numpy as np
import pytest

from data_pipeline.shard_io import ShardError, ShardWriter, _ustar_members, read_shard


def write_shard(tmp_path, docs):
    writer = ShardWriter(tmp_path, "00000", "train", "uint16", 10**9)
    for i, doc in enumerate(docs):
        writer.write(f"00000-{i:09d}", np.asarray(doc, np.uint16))
    writer.close()
    return tmp_path / writer.finished[0].name, writer.finished[0]


def docs_of(shard):
    return [shard.tokens[a:b].tolist() for a, b in zip(shard.starts, shard.ends)]


DOCS = [[1, 2, 3], [], list(range(700)), [65535] * 257]


def test_header_walk_matches_tarfile(tmp_path):
    path, _ = write_shard(tmp_path, DOCS)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar]
    assert _ustar_members(mm) == expected and len(expected) == len(DOCS)
    assert docs_of(read_shard(path, "uint16")) == DOCS


def test_archive_with_pax_headers_reads_through_tarfile(tmp_path):
    """A long member name makes tarfile write a pax header, which the walk hands over to tarfile."""
    path = tmp_path / "pax.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, doc in enumerate(DOCS):
            buf = io.BytesIO()
            np.save(buf, np.asarray(doc, np.uint16))
            info = tarfile.TarInfo(f"{'long-key-' * 20}{i}.tokens.npy")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    with open(path, "rb") as f:
        assert _ustar_members(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) is None
    assert docs_of(read_shard(path, "uint16")) == DOCS


def set_field(data: bytearray, header: int, start: int, value: bytes, signed_checksum: bool = False) -> None:
    """Write a header field, then the header's checksum (unsigned, or signed as some tars write)."""
    data[header + start:header + start + len(value)] = value
    data[header + 148:header + 156] = b" " * 8
    block = data[header:header + 512]
    total = sum(block) - (256 * sum(b >= 0x80 for b in block) if signed_checksum else 0)
    data[header + 148:header + 155] = f"{total:06o}\0".encode()


def second_header(data: bytearray) -> int:
    return 512 + 512 * -(-int(data[124:135], 8) // 512)


def test_signed_header_checksum_is_accepted_like_tarfile(tmp_path):
    path, _ = write_shard(tmp_path, DOCS)
    data = bytearray(path.read_bytes())
    set_field(data, second_header(data), 265, "usér".encode(), signed_checksum=True)  # uname, non-ASCII
    path.write_bytes(bytes(data))
    with tarfile.open(path) as tar:
        assert len(tar.getmembers()) == len(DOCS)
    assert docs_of(read_shard(path, "uint16")) == DOCS


@pytest.mark.parametrize("where", ["checksum", "size", "negative size"])
def test_damaged_header_is_a_corrupt_shard(tmp_path, where):
    path, info = write_shard(tmp_path, DOCS)
    data = bytearray(path.read_bytes())
    second = second_header(data)
    if where == "checksum":
        data[second + 10] ^= 0x01  # a flipped bit in a name: the header checksum no longer matches
    elif where == "size":  # more bytes than the archive holds (checksum fixed up: only the size is wrong)
        set_field(data, second, 124, b"77777777777")
    else:  # a signed size would walk back (or stand still) instead of forward
        set_field(data, second, 124, b"-0000001130")
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError) as err:
        read_shard(path, "uint16")
    assert err.value.reason == "corrupt_shards"


def test_a_reopened_shard_is_hashed_once_and_a_rewritten_one_again(tmp_path, monkeypatch):
    """Every stream part and every epoch reopens its shard: hash and index it once per process,
    but check a file that changed since again, even one whose size and mtime were kept."""
    import hashlib
    import os

    import data_pipeline.shard_io as shard_io

    path, info = write_shard(tmp_path, DOCS)
    hashed, sha256 = [], hashlib.sha256
    monkeypatch.setattr(shard_io.hashlib, "sha256", lambda data: hashed.append(path) or sha256(data))
    for _ in range(3):
        assert docs_of(read_shard(path, "uint16", info)) == DOCS
    assert len(hashed) == 1
    data, mtime = bytearray(path.read_bytes()), path.stat().st_mtime_ns
    data[-600] ^= 0xFF  # inside the last document's tokens: same size ...
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, mtime))  # ... and the old mtime, as `cp -p` keeps it
    with pytest.raises(ShardError, match="sha256"):
        read_shard(path, "uint16", info)
    assert len(hashed) == 2
