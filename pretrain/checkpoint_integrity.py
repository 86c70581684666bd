"""What proves a checkpoint whole: COMPLETE.json lists every file with its size and xxh3-128 hash.

The marker is written last, after every rank's files are on disk, and the directory is renamed
into place only then (see `pretrain.checkpoint`). Checking sizes finds truncation and missing files
at once; hashes find same-size damage (garbage written over a block, a bad disk sector) that
would otherwise load silently and train on NaNs, or crash unpickling DCP's `.metadata`.

Hashing is split over ranks: each rank hashes the DCP shard files it wrote (`__{rank}_*.distcp`,
still in its node's page cache right after a save, and local reads on a resume with the same world
size), the other files go round-robin, and the verdicts are combined (`pretrain.checkpoint`), so
verifying a checkpoint costs about its size / (ranks x disk bandwidth).
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import xxhash

MARKER = "COMPLETE.json"
_UNREADABLE = "cannot read"  # the reason's start when a file could not be read at all (maybe transiently)
MARKER_FORMAT = 2  # 1: sizes only (no checksums); such checkpoints are reported and passed over
HASH = "xxh3_128"
_CHUNK = 8 << 20
_DCP_SHARD = re.compile(r"__(\d+)_\d+\.distcp")


class CheckpointDamaged(ValueError):
    """A checkpoint directory that does not verify; the message names the file and why."""


@dataclass(frozen=True)
class FileRecord:
    size: int
    digest: str


def file_digest(path: Path) -> str:
    """xxh3-128 of a file, read in 8 MiB chunks (~10 GB/s from page cache on one core)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_marker(directory: Path, records: dict[str, FileRecord]) -> None:
    files = {name: {"size": r.size, HASH: r.digest} for name, r in sorted(records.items())}
    (directory / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "files": files}, indent=1))


def read_marker(directory: Path) -> dict[str, FileRecord]:
    """The marker's records; CheckpointDamaged when it is missing, garbled or of an older format."""
    marker = directory / MARKER
    if not marker.is_file():
        raise CheckpointDamaged(f"no {MARKER} (save never finished)")
    try:
        table = json.loads(marker.read_text())
        if table.get("format") != MARKER_FORMAT:
            raise CheckpointDamaged(f"{MARKER} has format {table.get('format')!r}, not {MARKER_FORMAT} "
                                    "(written without checksums by an older version)")
        records = {}
        for name, entry in table["files"].items():
            size, digest = entry["size"], entry[HASH]
            if not isinstance(size, int) or not isinstance(digest, str) or "/" in name:
                raise TypeError(f"bad entry for {name!r}")
            records[name] = FileRecord(size, digest)
        return records
    except CheckpointDamaged:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        raise CheckpointDamaged(f"unreadable {MARKER} ({type(e).__name__}: {e})") from None


def check_sizes(directory: Path, records: dict[str, FileRecord]) -> None:
    """Every listed file present with its size: cheap, and catches truncation and deletion."""
    for name, record in records.items():
        f = directory / name
        if not f.is_file():
            raise CheckpointDamaged(f"missing file {name}")
        size = f.stat().st_size
        if size != record.size:
            how = "truncated" if size < record.size else "changed since it was saved"
            raise CheckpointDamaged(f"file {name} has {size} bytes, expected {record.size} ({how})")


def share(names: Iterable[str], part: int, parts: int) -> list[str]:
    """This rank's files to hash: the DCP shards rank `part` wrote (`__{part}_*.distcp`; with a
    different world size, by writer rank modulo `parts`), then the other files round-robin over
    their sorted names. Every file lands in exactly one share."""
    mine, others = [], []
    for name in sorted(names):
        m = _DCP_SHARD.fullmatch(name)
        if m is None:
            others.append(name)
        elif int(m.group(1)) % parts == part:
            mine.append(name)
    return mine + [n for i, n in enumerate(others) if i % parts == part]


def check_digests(directory: Path, records: dict[str, FileRecord], names: Iterable[str]) -> None:
    for name in names:
        if file_digest(directory / name) != records[name].digest:
            raise CheckpointDamaged(f"file {name} does not match its checksum (damaged)")


def verify_share(directory: Path, part: int = 0, parts: int = 1, checksums: bool = True) -> str | None:
    """None when the marker, all sizes and this share's hashes check out, else the reason."""
    try:
        records = read_marker(directory)
        check_sizes(directory, records)
        if checksums:
            check_digests(directory, records, share(records, part, parts))
    except CheckpointDamaged as e:
        return str(e)
    except OSError as e:  # an unreadable sector, a vanished or forbidden file: as damaged, never a crash
        return f"{_UNREADABLE} {Path(e.filename).name if e.filename else 'a file'} ({type(e).__name__}: {e.strerror})"
    return None


def is_damage(reason: str) -> bool:
    """A `verify_share` reason that is the checkpoint's own damage (missing marker or file, wrong
    size or hash), not a read that failed (an I/O error, a file a shared filesystem does not show yet)."""
    return not reason.startswith(_UNREADABLE)
