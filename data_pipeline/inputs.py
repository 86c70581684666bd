"""Raw inputs: finding them, checking them at start, and reading documents out of them.

Every problem that can be seen before tokenizing (missing path, empty input, unknown text field)
raises DataInputError at once; per-document problems are counted by reason and skipped.
"""
from __future__ import annotations

import glob
import gzip
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataInputError
from data_pipeline.megatron_indexed import iter_megatron_documents, megatron_prefix

FORMATS = ("jsonl", "parquet", "text", "megatron")


@dataclass(frozen=True)
class InputFile:
    path: Path  # for megatron: the dataset prefix
    format: str  # one of FORMATS

    @property
    def size(self) -> int:
        return Path(str(self.path) + ".bin").stat().st_size if self.format == "megatron" else self.path.stat().st_size


def detect_format(path: Path) -> str:
    name = path.name
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "text"
    if name.endswith((".bin", ".idx")):
        return "megatron"
    raise DataInputError(path, "--input", "unknown file type",
                         "use .jsonl[.gz|.zst], .parquet, .txt, Megatron .bin/.idx, or --format")


def resolve_inputs(patterns: list[str], input_format: str = "auto") -> list[InputFile]:
    """Expand globs/dirs into a sorted, de-duplicated list; every pattern must match something."""
    found: dict[Path, InputFile] = {}
    for pattern in patterns:
        paths = sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [Path(pattern)]
        if paths and paths[0].is_dir() and len(paths) == 1:
            paths = sorted(p for p in paths[0].rglob("*") if p.is_file())
        if not paths or not all(p.exists() for p in paths):
            raise DataInputError(pattern, "--input", "matches no file", "check the path or glob")
        for p in paths:
            fmt = detect_format(p) if input_format == "auto" else input_format
            key = megatron_prefix(p) if fmt == "megatron" else p
            found[key] = InputFile(key, fmt)
    if not found:
        raise DataInputError(patterns, "--input", "no inputs given", "pass at least one path or glob")
    for inp in found.values():
        if inp.size == 0:
            raise DataInputError(inp.path, "--input", "empty file", "remove it from the inputs")
    return [found[k] for k in sorted(found)]


def _open_text_stream(path: Path) -> io.BufferedIOBase:
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def check_text_field(inp: InputFile, text_field: str) -> None:
    """Fail at start if the first record of a jsonl file, or a parquet schema, lacks the field."""
    if inp.format == "jsonl":
        with _open_text_stream(inp.path) as f:
            first = f.readline()
        try:
            record = json.loads(first)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataInputError(inp.path, "line 1", f"not JSON ({exc})", "one JSON object per line") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = list(record) if isinstance(record, dict) else type(record).__name__
            raise DataInputError(inp.path, f"--text-field {text_field!r}", f"absent from line 1 (keys: {keys})",
                                 "pass --text-field with one of those keys")
    elif inp.format == "parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(inp.path).schema_arrow.names
        if text_field not in names:
            raise DataInputError(inp.path, f"--text-field {text_field!r}", f"not a column (columns: {names})",
                                 "pass --text-field with one of those columns")


def iter_documents(inp: InputFile, text_field: str, skipped: Counter) -> Iterator[str | np.ndarray]:
    """Yield texts (or token arrays, for Megatron); count and skip unusable records in `skipped`."""
    if inp.format == "megatron":
        yield from iter_megatron_documents(inp.path)
        return
    for raw in _iter_raw(inp, text_field, skipped):
        if not isinstance(raw, str):
            skipped["missing_field"] += 1
        elif not raw.strip():
            skipped["empty_docs"] += 1
        elif not _is_valid_unicode(raw):
            skipped["bad_utf8"] += 1
        else:
            yield raw


def _iter_raw(inp: InputFile, text_field: str, skipped: Counter) -> Iterator[object]:
    if inp.format == "text":
        try:
            yield inp.path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped["bad_utf8"] += 1
    elif inp.format == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(inp.path).iter_batches(batch_size=4096, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:
        with _open_text_stream(inp.path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except UnicodeDecodeError:
                    skipped["bad_utf8"] += 1
                    continue
                except json.JSONDecodeError:
                    skipped["bad_json"] += 1
                    continue
                yield record.get(text_field) if isinstance(record, dict) else None


def _is_valid_unicode(text: str) -> bool:
    """Lone surrogates (e.g. from a JSON "\\ud800" escape) are not encodable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
