"""The manifest: the one JSON file that makes a directory of shards a prepared dataset.

It is written last and atomically, so a shard is only ever listed once complete; it records the
tokenizer identity, the array encoding, and a checksum per shard so the loader can detect rot.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.errors import DataInputError
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
    skipped: dict[str, int] = field(default_factory=dict)  # prepare-time skips by reason
    inputs: list[str] = field(default_factory=list)
    format: str = FORMAT
    version: int = VERSION
    sample_keys: dict[str, str] = field(default_factory=lambda: dict(SAMPLE_KEYS))
    split_rule: str = "validation iff blake2b-64(document utf-8 or token bytes) / 2**64 < val_fraction"

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


def write_atomic(path: Path, text: str) -> None:
    """Write then rename, so readers see the old file or the whole new one, never a torn one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_manifest(out_dir: Path, manifest: Manifest) -> Path:
    d = asdict(manifest)
    d["vocab_size"], d["bos_id"], d["eos_id"] = manifest.vocab_size, manifest.bos_id, manifest.eos_id
    path = Path(out_dir) / MANIFEST_FILE
    write_atomic(path, json.dumps(d, indent=1) + "\n")
    return path


def read_manifest(prepared_dir: str | Path) -> Manifest:
    path = Path(prepared_dir) / MANIFEST_FILE
    if not path.is_file():
        raise DataInputError(path, "manifest", "missing (not a prepared dir, or prepare did not finish)",
                             "run `python -m data_pipeline.prepare --out DIR ...` to completion")
    try:
        d = json.loads(path.read_text())
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise DataInputError(path, "format/version", f"got {d.get('format')!r} v{d.get('version')}",
                                 f"re-prepare the data with this version ({FORMAT} v{VERSION})")
        tok = TokenizerIdentity(**d["tokenizer"])
        shards = [ShardInfo(**s) for s in d["shards"]]
        return Manifest(tokenizer=tok, dtype=d["dtype"], val_fraction=d["val_fraction"], shards=shards,
                        skipped=d.get("skipped", {}), inputs=d.get("inputs", []))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise DataInputError(path, str(exc), "malformed manifest", "re-run prepare into a fresh --out") from None
