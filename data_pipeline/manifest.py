"""The manifest: the one JSON file that makes a directory of shards a prepared dataset.

It is written last and atomically, so a shard is only ever listed once complete; it records the
tokenizer identity, the array encoding, and a checksum per shard so the loader can detect rot.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.errors import DataInputError
from data_pipeline.files import write_atomic
from data_pipeline.tokenizer import TokenizerIdentity

MANIFEST_FILE = "manifest.json"
FORMAT = "hybrid-pretrain/tokenized-webdataset"
VERSION = 1
TOKENS_KEY = "tokens.npy"
SAMPLE_KEYS = {
    "__key__": "<job:05d>-<document index within the job:09d>",
    TOKENS_KEY: "NumPy .npy (format 1.0), 1-D array of token ids of one document, dtype as in "
                "'dtype', WITHOUT BOS/EOS (the loader adds them); `webdataset.WebDataset(url)"
                ".decode()` returns it as a numpy array",
}


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name relative to the prepared dir
    split: str  # "train" or "val"
    num_docs: int
    num_tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: TokenizerIdentity
    dtype: str  # "uint16" or "uint32"
    val_fraction: float
    shards: list[ShardInfo]
    skipped: dict[str, int] = field(default_factory=dict)  # prepare-time skips by reason (records and files)
    inputs: list[str] = field(default_factory=list)
    # empty / damaged / truncated input files by kind: [{"path", "problem", "docs_kept"}, ...]
    skipped_files: dict[str, list[dict]] = field(default_factory=dict)
    format: str = FORMAT
    version: int = VERSION
    sample_keys: dict[str, str] = field(default_factory=lambda: dict(SAMPLE_KEYS))
    split_rule: str = "validation iff blake2b-64(document utf-8 or token bytes) / 2**64 < val_fraction"

    @functools.cached_property
    def digest(self) -> str:
        """The prepared data's identity wherever its directory lies (a hash of the manifest's
        content: shards, token counts, tokenizer): a resumed run finds its data moved or re-mounted."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    @functools.cached_property
    def data_digest(self) -> str:
        """The data's identity alone - tokenizer, token dtype, shard names and hashes - which no
        change of this code's manifest fields or defaults moves: a resumed run refuses other data
        at its path by this one."""
        content = {"tokenizer": asdict(self.tokenizer), "dtype": self.dtype,
                   "shards": [(s.name, s.sha256) for s in self.shards]}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def mean_doc_tokens(self, split: str) -> float:
        shards = self.split_shards(split)
        docs = sum(s.num_docs for s in shards)
        return sum(s.num_tokens for s in shards) / max(docs, 1)


def dtype_for_vocab(vocab_size: int) -> str:
    """uint16 when every id fits, else uint32: halves disk and page-cache for <=64K vocabularies."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    d = asdict(manifest)
    d["vocab_size"], d["bos_id"], d["eos_id"] = manifest.vocab_size, manifest.bos_id, manifest.eos_id
    path = Path(out_dir) / MANIFEST_FILE
    write_atomic(path, json.dumps(d, indent=1) + "\n")
    return path


def read_manifest(prepared_dir: str | Path) -> Manifest:
    """Read and type-check a manifest: any bad field is a one-line DataInputError naming it."""
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataInputError(path, "manifest", "missing (not a prepared dir, or prepare did not finish)",
                             "run `python -m data_pipeline.prepare --out DIR ...` to completion")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataInputError(path, "manifest", f"not JSON ({exc})", _REPREPARE) from None
    _check_manifest(path, d)
    return Manifest(tokenizer=TokenizerIdentity(**d["tokenizer"]), dtype=d["dtype"], val_fraction=d["val_fraction"],
                    shards=[ShardInfo(**s) for s in d["shards"]], skipped=d.get("skipped", {}),
                    inputs=d.get("inputs", []), skipped_files=d.get("skipped_files", {}))


# --- the manifest's schema: every field it has, with its type -------------------------------------

_REPREPARE = "re-run prepare into a fresh --out"


class _Int:
    """A JSON integer (not a bool) >= `low`."""

    def __init__(self, low: int = 0):
        self.low = low

    def check(self, v: object) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "an integer"
        return None if v >= self.low else f"an integer >= {self.low}"


class _Float:
    def __init__(self, low: float, high: float):
        self.low, self.high = low, high

    def check(self, v: object) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not self.low <= v <= self.high:
            return f"a number in [{self.low}, {self.high}]"
        return None


class _Str:
    def __init__(self, *choices: str):
        self.choices = choices

    def check(self, v: object) -> str | None:
        if not isinstance(v, str):
            return "a string"
        return None if not self.choices or v in self.choices else f"one of {list(self.choices)}"


class _List:
    def __init__(self, item: object):
        self.item = item


class _Dict:
    """A JSON object: with exactly these `fields` (name -> type), or any string keys mapping to `values`."""

    def __init__(self, fields: dict[str, object] | None = None, values: object = None, optional: tuple = ()):
        self.fields, self.values, self.optional = fields, values, optional


_TOKENIZER = _Dict({"kind": _Str(), "sha256": _Str(), "vocab_size": _Int(1), "bos_id": _Int(), "eos_id": _Int()})
_SHARD = _Dict({"name": _Str(), "split": _Str("train", "val"), "num_docs": _Int(), "num_tokens": _Int(),
                "bytes": _Int(), "sha256": _Str()})
_SKIPPED_FILE = _Dict({"path": _Str(), "problem": _Str(), "docs_kept": _Int()})
_OPTIONAL = ("skipped", "inputs", "skipped_files", "sample_keys", "split_rule", "vocab_size", "bos_id", "eos_id")
MANIFEST_SCHEMA = _Dict({
    "format": _Str(FORMAT), "version": _Int(), "tokenizer": _TOKENIZER, "dtype": _Str("uint16", "uint32"),
    "val_fraction": _Float(0.0, 1.0), "shards": _List(_SHARD), "skipped": _Dict(values=_Int()),
    "inputs": _List(_Str()), "skipped_files": _Dict(values=_List(_SKIPPED_FILE)),
    "sample_keys": _Dict(values=_Str()), "split_rule": _Str(),
    "vocab_size": _Int(1), "bos_id": _Int(), "eos_id": _Int(),
}, optional=_OPTIONAL)


def _type_name(v: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(v), type(v).__name__)


def _schema_errors(v: object, t: object, where: str) -> tuple[str, str] | None:
    """(field, problem) for the first value that does not fit the schema, or None."""
    if isinstance(t, (_Int, _Float, _Str)):
        want = t.check(v)
        return None if want is None else (where, f"{_short(v)} is {_type_name(v)}, expected {want}")
    if isinstance(t, _List):
        if not isinstance(v, list):
            return where, f"{_short(v)} is {_type_name(v)}, expected a list"
        return next((e for i, x in enumerate(v) if (e := _schema_errors(x, t.item, f"{where}[{i}]"))), None)
    assert isinstance(t, _Dict)
    if not isinstance(v, dict):
        return where, f"{_short(v)} is {_type_name(v)}, expected an object"
    prefix = f"{where}." if where else ""
    if t.fields is None:
        return next((e for k, x in v.items() if (e := _schema_errors(x, t.values, f"{prefix}{k}"))), None)
    missing = [k for k in t.fields if k not in v and k not in t.optional]
    if missing:
        return f"{prefix}{missing[0]}", "missing"
    if where and (extra := [k for k in v if k not in t.fields]):  # nested objects are exact; the top level may grow
        return f"{prefix}{extra[0]}", f"unknown field (expected only {list(t.fields)})"
    return next((e for k, sub in t.fields.items() if k in v and (e := _schema_errors(v[k], sub, f"{prefix}{k}"))), None)


def _short(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _check_manifest(path: Path, d: object) -> None:
    if isinstance(d, dict) and (d.get("format") != FORMAT or d.get("version") != VERSION):
        raise DataInputError(path, "format/version", f"got {d.get('format')!r} v{d.get('version')}",
                             f"re-prepare the data with this version ({FORMAT} v{VERSION})")
    error = _schema_errors(d, MANIFEST_SCHEMA, "")
    if error:
        field_name, problem = error
        raise DataInputError(path, field_name or "manifest", problem,
                             f"correct that field (the types are in data_pipeline/manifest.py), or {_REPREPARE}")
    for key in ("vocab_size", "bos_id", "eos_id"):
        if key in d and d[key] != d["tokenizer"][key]:
            raise DataInputError(path, key, f"{d[key]} differs from tokenizer.{key} {d['tokenizer'][key]}",
                                 f"make them agree, or {_REPREPARE}")
