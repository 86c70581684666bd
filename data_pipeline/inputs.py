"""Raw inputs: finding them, probing them at start, and reading documents out of them.

One policy for bad input. A problem with the options (missing path, unknown file type, a
--text-field the data does not have, half a Megatron pair) raises DataInputError at once. Damage
in the data is skipped and counted by kind, never silently:

- a record (jsonl line, parquet row, text file, Megatron document): `bad_utf8`, `bad_json`,
  `missing_field`, `empty_docs` (and, after tokenizing, `out_of_range_ids`);
- a whole file (a FileProblem): `empty_files` (no records), `damaged_files` (unreadable: bad
  compression, not parquet, a Megatron index that does not fit its .bin), `truncated_files` (the
  data stops mid-stream: a compressed stream or the last line is cut). The documents before a
  cut are kept (they decode intact) and the file is always named with how many that was; a file
  damaged mid-stream (e.g. a failed checksum) is dropped whole, as what decoded before is suspect.

With strict=True any of these skips raises a one-line DataInputError naming the file instead.
"""
from __future__ import annotations

import glob
import gzip
import json
import logging
import os
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.errors import DataInputError
from data_pipeline.megatron_indexed import iter_megatron_documents, megatron_prefix, read_index

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "parquet", "text", "megatron")
FILE_KINDS = ("empty_files", "damaged_files", "truncated_files")
RECORD_REASONS = {"bad_utf8": "not valid UTF-8", "bad_json": "not valid JSON",
                  "missing_field": "no string in the text field", "empty_docs": "an empty document",
                  "out_of_range_ids": "a token id outside the vocabulary"}
READ_CHUNK = 1 << 20  # compressed/raw bytes per read
PREPARED_MARKERS = {"manifest.json", "prepare_settings.json"}  # files of a prepare's --out directory
PROBE_LINES = 100  # a jsonl file none of whose first this many non-blank lines is JSON is damaged
STRICT_FIX = "repair or re-fetch the file, or remove it from --input (without --strict it is skipped and reported)"


class FileProblem(Exception):
    """A whole input file, or the rest of it, is unusable. `kind` is one of FILE_KINDS."""

    def __init__(self, kind: str, detail: str, docs_read: int = 0):
        super().__init__(kind, detail, docs_read)
        detail = " ".join(detail.split())  # a library's message may span lines: reports are one line each
        self.kind, self.detail, self.docs_read = kind, detail if len(detail) <= 300 else detail[:297] + "...", docs_read

    @property
    def problem(self) -> str:
        """One line for warnings, the summary and the manifest; says what was kept."""
        n = self.docs_read
        if self.kind == "truncated_files":
            if not n:
                return f"TRUNCATED before its first document ({self.detail}); skipped"
            return (f"TRUNCATED after {n} documents ({self.detail}); the {n} documents before the cut were kept, "
                    "the rest of the file is lost")
        if self.kind == "damaged_files":  # what decoded before damage is not trusted: the whole file goes
            return f"damaged ({self.detail}{f', found after {n} documents' if n else ''}); skipped, the whole file"
        return f"empty ({self.detail}); skipped"

    @property
    def docs_kept(self) -> int:
        return self.docs_read if self.kind == "truncated_files" else 0

    def record(self, path: Path) -> dict:
        """What the job record holds for this file (the manifest lists it, less `kind`, under that kind)."""
        return {"kind": self.kind, "path": str(path), "problem": self.problem, "docs_kept": self.docs_kept}

    def strict_error(self, path: Path) -> DataInputError:
        what = {"truncated_files": f"truncated after {self.docs_read} documents ({self.detail})",
                "damaged_files": f"damaged ({self.detail})", "empty_files": f"empty ({self.detail})"}[self.kind]
        return DataInputError(path, self.kind, f"{what} (--strict)", STRICT_FIX)


def strict_record_error(path: Path, where: str, reason: str) -> DataInputError:
    return DataInputError(path, where, f"{RECORD_REASONS.get(reason, reason)} ({reason}; --strict)",
                              "repair or remove that record, or drop --strict to skip and count it")


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


def resolve_inputs(patterns: list[str], input_format: str = "auto", exclude: Path | None = None) -> list[InputFile]:
    """Expand globs/dirs into a sorted, de-duplicated list (one file spelled two ways counts once);
    every pattern must match something. Files under `exclude` (the output directory, when it lies
    inside an input directory) are left out."""
    found: dict[Path, InputFile] = {}
    seen: set[Path] = set()  # resolved paths: ./a.jsonl and /abs/a.jsonl are one input
    skip = exclude.resolve() if exclude is not None else None
    for pattern in patterns:
        if not pattern.strip():
            raise DataInputError(repr(pattern), "--input", "an empty path (it would read the current directory)",
                                 "pass a file, directory or glob")
        paths = [f for p in _matches(pattern, input_format) for f in (_files_under(p) if p.is_dir() else [p])]
        if not paths or not all(p.exists() for p in paths):
            raise DataInputError(pattern, "--input", "matches no file", "check the path or glob")
        for p in paths:
            real = p.resolve()
            if real in seen or (skip is not None and real.is_relative_to(skip)):
                continue
            seen.add(real)
            fmt = detect_format(p) if input_format == "auto" else input_format
            key = megatron_prefix(p) if fmt == "megatron" else p
            found[key] = InputFile(key, fmt)
    if not found:
        raise DataInputError(patterns, "--input", "no inputs given", "pass at least one path or glob")
    return [found[k] for k in sorted(found)]


def _matches(pattern: str, input_format: str) -> list[Path]:
    """What one --input names: the path itself where it exists (a name may hold '[' or '*'), a
    Megatron dataset by its PREFIX (PREFIX.bin and PREFIX.idx), else the glob's matches."""
    path = Path(pattern)
    if path.exists():
        return [path]
    halves = [Path(pattern + ext) for ext in (".bin", ".idx")]
    if input_format in ("auto", "megatron") and all(h.is_file() for h in halves):
        return halves
    return sorted(Path(p) for p in glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [path]


def _files_under(top: Path) -> list[Path]:
    """The files of a directory tree, sorted, following links to directories (each directory once:
    a link loop ends). Left out, with a warning: broken links, hidden entries (.git, a prepare's
    .jobs) and prepared outputs (a tree holding manifest.json or prepare_settings.json: an earlier
    prepare into a subdirectory is not raw text)."""
    files, seen = [], set()
    for root, dirs, names in os.walk(top, followlinks=True):
        real, markers = Path(root).resolve(), sorted(PREPARED_MARKERS.intersection(names))
        if markers and real not in seen:
            log.warning("%s: a prepared output (it holds %s), not read as input", root, " and ".join(markers))
        if real in seen or markers:
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(root) / name
            if name.startswith("."):
                continue
            if path.is_file():
                files.append(path)
            else:
                log.warning("%s: a broken link (or not a regular file), not read", path)
    return sorted(files)


# --- byte streams: every way a compressed file can be cut or damaged becomes a FileProblem ---------

def _plain_chunks(f) -> Iterator[bytes]:
    while data := f.read(READ_CHUNK):
        yield data


def _gzip_chunks(f) -> Iterator[bytes]:
    g = gzip.GzipFile(fileobj=f, mode="rb")
    while data := g.read1(READ_CHUNK):
        yield data


def _zstd_chunks(f) -> Iterator[bytes]:
    """Frame by frame, so a stream that ends inside a frame is seen (a stream reader ends silently)."""
    import zstandard

    dctx, frame = zstandard.ZstdDecompressor(), None
    while data := f.read(READ_CHUNK):
        while data:
            frame = frame or dctx.decompressobj()
            out = frame.decompress(data)
            if out:
                yield out
            data, frame = (frame.unused_data, None) if frame.eof else (b"", frame)
    if frame is not None:
        raise FileProblem("truncated_files", "the zstd stream ends inside a frame")


def _chunks(path: Path) -> Iterator[bytes]:
    """The decompressed bytes of a file, raising FileProblem for a cut or damaged stream."""
    try:
        import zstandard

        zstd_error: type[Exception] = zstandard.ZstdError
    except ImportError:  # pragma: no cover - a dependency
        zstd_error = zlib.error
    name = path.name
    reader = _gzip_chunks if name.endswith(".gz") else _zstd_chunks if name.endswith(".zst") else _plain_chunks
    try:
        with open(path, "rb") as f:
            yield from reader(f)
    except EOFError:
        raise FileProblem("truncated_files", "the gzip stream ends inside a member") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise FileProblem("damaged_files", f"gzip: {exc}") from None
    except zstd_error as exc:
        raise FileProblem("damaged_files", f"zstd: {exc}") from None
    except OSError as exc:
        raise FileProblem("damaged_files", f"read error: {exc}") from None


def _iter_lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(1-based line number, line without its newline, whether a newline ended it)."""
    rest: list[bytes] = []
    lineno = 0
    for chunk in _chunks(path):
        parts = chunk.split(b"\n")
        if len(parts) == 1:
            rest.append(chunk)
            continue
        rest.append(parts[0])
        lineno += 1
        yield lineno, b"".join(rest), True
        for line in parts[1:-1]:
            lineno += 1
            yield lineno, line, True
        rest = [parts[-1]]
    tail = b"".join(rest)
    if tail:
        yield lineno + 1, tail, False


# --- start: what can be seen before tokenizing -------------------------------------------------------

def probe_input(inp: InputFile, text_field: str) -> FileProblem | None:
    """Raise DataInputError for a problem with the options; return the FileProblem that makes this
    file skipped (empty, unreadable, cut before its first record), or None when it looks usable."""
    if inp.format == "megatron":
        for suffix in (".bin", ".idx"):
            if not Path(str(inp.path) + suffix).is_file():
                raise DataInputError(str(inp.path) + suffix, "path", "missing half of a Megatron dataset",
                                     "pass a PREFIX with both PREFIX.bin and PREFIX.idx")
        try:
            index = read_index(inp.path)
        except ValueError as exc:
            if Path(str(inp.path) + ".idx").stat().st_size == 0 and inp.size == 0:
                return FileProblem("empty_files", "empty .bin and .idx")
            return FileProblem("damaged_files", f"Megatron index: {exc}")
        if index.bin_bytes_needed > inp.size:
            return FileProblem("damaged_files", f"the .bin has {inp.size} bytes, its index needs "
                                                f"{index.bin_bytes_needed} (a truncated .bin)")
        return FileProblem("empty_files", "no documents in the index") if index.num_docs == 0 else None
    if inp.size == 0:
        return FileProblem("empty_files", "0 bytes")
    if inp.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            meta = pq.ParquetFile(inp.path)
            names, rows = meta.schema_arrow.names, meta.metadata.num_rows
        except (pa.ArrowException, OSError) as exc:
            return FileProblem("damaged_files", f"not a readable parquet file ({exc})")
        if text_field not in names:
            raise DataInputError(inp.path, f"--text-field {text_field!r}", f"not a column (columns: {names})",
                                 "pass --text-field with one of those columns")
        return FileProblem("empty_files", "no rows") if rows == 0 else None
    if inp.format == "jsonl":
        return _probe_jsonl(inp.path, text_field)
    return None


def _probe_jsonl(path: Path, text_field: str) -> FileProblem | None:
    """Check that the field is there, in one of the first PROBE_LINES JSON objects: absent from all
    of them it is the wrong --text-field; absent from some (a header record) it is left to the
    per-line policy (counted as missing_field), as are bad lines and JSON that is no object."""
    bad, without = 0, []
    try:
        for lineno, line, _ in _iter_lines(path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if not isinstance(record, dict):
                bad += 1
                if bad == PROBE_LINES:
                    return FileProblem("damaged_files", f"none of the first {PROBE_LINES} lines is a JSON object")
                continue
            if text_field in record:
                return None
            without.append((lineno, list(record)))
            if len(without) == PROBE_LINES:
                break
    except FileProblem as problem:
        return problem
    if without:
        lineno, keys = without[0]
        raise DataInputError(path, f"--text-field {text_field!r}", f"absent from every record read (line {lineno}'s "
                             f"keys: {keys})", "pass --text-field with one of those keys")
    return None if bad else FileProblem("empty_files", "no records")


# --- reading -----------------------------------------------------------------------------------------

def iter_documents(inp: InputFile, text_field: str, skipped: Counter, strict: bool = False
                   ) -> Iterator[str | np.ndarray]:
    """Yield texts (or token arrays, for Megatron); count and skip unusable records in `skipped`
    (strict: raise on the first). A cut or damaged file raises FileProblem once the documents
    before the damage are yielded; its `docs_read` says how many that was."""
    for _, doc in iter_located_documents(inp, text_field, skipped, strict):
        yield doc


def iter_located_documents(inp: InputFile, text_field: str, skipped: Counter, strict: bool = False
                           ) -> Iterator[tuple[str, str | np.ndarray]]:
    """iter_documents, each document with where it is in the file ("line 7", "row 3", "document 2")."""
    n = 0
    try:
        for raw, where in _iter_raw(inp, text_field, skipped, strict):
            if isinstance(raw, np.ndarray):
                doc = raw
            elif not isinstance(raw, str):
                _skip(inp, where, "missing_field", skipped, strict)
                continue
            elif not raw.strip():
                _skip(inp, where, "empty_docs", skipped, strict)
                continue
            elif not _is_valid_unicode(raw):
                _skip(inp, where, "bad_utf8", skipped, strict)
                continue
            else:
                doc = raw
            n += 1
            yield where, doc
    except FileProblem as problem:
        problem.docs_read = n
        raise


def _skip(inp: InputFile, where: str, reason: str, skipped: Counter, strict: bool) -> None:
    if strict:
        raise strict_record_error(inp.path, where, reason)
    skipped[reason] += 1


def _iter_raw(inp: InputFile, text_field: str, skipped: Counter, strict: bool) -> Iterator[tuple[object, str]]:
    """(raw value, where it is) per record; unusable lines are counted here."""
    if inp.format == "megatron":
        try:
            for i, doc in enumerate(iter_megatron_documents(inp.path)):
                yield doc, f"document {i}"
        except (ValueError, IndexError, OSError) as exc:
            raise FileProblem("damaged_files", f"Megatron data: {exc}") from None
    elif inp.format == "text":
        try:
            data = inp.path.read_bytes()
        except OSError as exc:
            raise FileProblem("damaged_files", f"read error: {exc}") from None
        try:
            yield data.decode("utf-8-sig"), "the file"  # without a byte-order mark (Windows editors write one)
        except UnicodeDecodeError:
            _skip(inp, "the file", "bad_utf8", skipped, strict)
    elif inp.format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            for batch in pq.ParquetFile(inp.path).iter_batches(batch_size=4096, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    yield value, f"row {row}"
                    row += 1
        except (pa.ArrowException, OSError) as exc:
            raise FileProblem("damaged_files", f"parquet: {exc}") from None
    else:
        for lineno, line, complete in _iter_lines(inp.path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                _skip(inp, f"line {lineno}", "bad_utf8", skipped, strict)
                continue
            except json.JSONDecodeError:
                if not complete:  # the file stops inside its last record
                    raise FileProblem("truncated_files", f"line {lineno}, the last, stops mid-record") from None
                _skip(inp, f"line {lineno}", "bad_json", skipped, strict)
                continue
            yield (record.get(text_field) if isinstance(record, dict) else None), f"line {lineno}"


def _is_valid_unicode(text: str) -> bool:
    """Lone surrogates (e.g. from a JSON "\\ud800" escape) are not encodable text."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
