"""`python -m data_pipeline.demo_corpus --out DIR`: a real corpus with no network.

The standard library's .py sources are on every Python install; a byte-level BPE (~8K vocab)
trained on them with `tokenizers` and a prepare over the same files give `make demo` a few
million tokens of real code in well under a minute.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.errors import DataInputError
from data_pipeline.files import make_dir
from data_pipeline.prepare import PrepareConfig, prepare
from data_pipeline.tokenizer import TOKENIZER_FILE

SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>"]


def stdlib_sources(max_bytes: int) -> list[Path]:
    """Stdlib .py files in sorted order (site-packages excluded) up to `max_bytes` in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "dist-packages" in path.parts or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0 or total + size > max_bytes:
            continue
        files.append(path)
        total += size
    return files


def train_bpe(files: list[Path], vocab_size: int, out_path: Path) -> Path:
    """Byte-level BPE: every string is encodable, so no document is ever lost to <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_utf8_texts(files), trainer)
    tok.save(str(out_path))
    return out_path


def _utf8_texts(files: list[Path]):
    """A few stdlib files are Latin-1 test data; BPE trains on the rest (prepare counts them as bad_utf8)."""
    for f in files:
        try:
            yield f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue


def build_demo_corpus(out_dir: str | Path, max_bytes: int = 12 << 20, vocab_size: int = 8192,
                      shard_tokens: int = 1 << 15, workers: int = 2, progress: bool = False) -> Path:
    """Build (or finish building) the demo corpus in `out_dir`; returns the prepared dir."""
    out = Path(out_dir)
    if max_bytes < 1:
        raise DataInputError(max_bytes, "--max-bytes", "not positive", "pass a positive byte count (default 12 MiB)")
    make_dir(out)
    files = stdlib_sources(max_bytes)
    tok_path = out / TOKENIZER_FILE
    if not tok_path.is_file():
        train_bpe(files, vocab_size, out / "tokenizer.json.tmp").replace(tok_path)
    prepare(PrepareConfig(inputs=[str(f) for f in files], tokenizer=str(tok_path), out=out,
                          shard_tokens=shard_tokens, val_fraction=0.02, workers=workers,
                          input_format="text", job_bytes=max(max_bytes // 8, 1 << 20), progress=progress))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--max-bytes", type=int, default=12 << 20, help="stdlib source bytes to use")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        out = build_demo_corpus(a.out, a.max_bytes, workers=a.workers, progress=True)
    except DataInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(f"demo corpus ready in {out} ({time.perf_counter() - t0:.1f}s)")


if __name__ == "__main__":
    main()
