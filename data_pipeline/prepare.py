"""`python -m data_pipeline.prepare`: raw text -> tokenized WebDataset shards + manifest.

Work is cut into jobs (consecutive input files up to `job_bytes`); each job writes its own shards
and, last, a small record in `.jobs/`. A re-run skips jobs whose record and shards exist, so an
interrupted prepare resumes; the manifest is written once all jobs are done, atomically.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import DataInputError
from data_pipeline.inputs import FORMATS, InputFile, check_text_field, iter_documents, resolve_inputs
from data_pipeline.manifest import Manifest, ShardInfo, dtype_for_vocab, write_atomic, write_manifest
from data_pipeline.shard_io import ShardWriter
from data_pipeline.split import is_validation
from data_pipeline.tokenizer import TOKENIZER_FILE, JsonTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)
JOBS_DIR = ".jobs"
SETTINGS_FILE = "prepare_settings.json"
ENCODE_BATCH = 256


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str  # "byte" or a tokenizer.json
    out: Path
    text_field: str = "text"
    shard_tokens: int = 1 << 24  # 32 MiB of uint16 per shard: many shards per canonical stream
    val_fraction: float = 0.005
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    input_format: str = "auto"
    job_bytes: int = 256 << 20  # raw input bytes per job: the unit of parallelism and of resume
    progress: bool = True


@dataclass(frozen=True)
class Job:
    index: int
    inputs: tuple[InputFile, ...]


def plan_jobs(inputs: list[InputFile], job_bytes: int) -> list[Job]:
    """Group consecutive inputs (sorted order) so many small files make few, full shards."""
    groups: list[list[InputFile]] = [[]]
    size = 0
    for inp in inputs:
        if groups[-1] and size + inp.size > job_bytes:
            groups.append([])
            size = 0
        groups[-1].append(inp)
        size += inp.size
    return [Job(i, tuple(g)) for i, g in enumerate(groups)]


def run_job(job: Job, cfg: PrepareConfig, tok: Tokenizer) -> dict:
    """Tokenize one job's documents into train/val shards; return the record written to .jobs/."""
    out, prefix = Path(cfg.out), f"{job.index:05d}"
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: ShardWriter(out, prefix, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    skipped: Counter = Counter()
    n_docs = 0

    def flush(batch: list[str | np.ndarray]) -> None:
        nonlocal n_docs
        texts = [d for d in batch if isinstance(d, str)]
        encoded = iter(tok.encode_batch(texts)) if texts else iter(())
        for doc in batch:
            ids = np.asarray(next(encoded) if isinstance(doc, str) else _strip_eos(doc, tok.eos_id), np.int64)
            if ids.size == 0:
                skipped["empty_docs"] += 1
            elif ids.min() < 0 or ids.max() >= tok.vocab_size:
                skipped["out_of_range_ids"] += 1
            else:
                split = "val" if is_validation(doc, cfg.val_fraction) else "train"
                writers[split].write(f"{prefix}-{n_docs:09d}", ids)
                n_docs += 1

    for inp in job.inputs:
        before = Counter(skipped)
        batch: list[str | np.ndarray] = []
        for doc in iter_documents(inp, cfg.text_field, skipped):
            batch.append(doc)
            if len(batch) == ENCODE_BATCH:
                flush(batch)
                batch = []
        flush(batch)
        if skipped != before:
            log.warning("%s: skipped documents %s", inp.path, dict(skipped - before))
    for w in writers.values():
        w.close()
    shards = [asdict(s) for w in writers.values() for s in w.finished]
    record = {"inputs": [str(i.path) for i in job.inputs], "shards": shards, "skipped": dict(skipped)}
    write_atomic(out / JOBS_DIR / f"{prefix}.json", json.dumps(record))
    return record


def _strip_eos(tokens: np.ndarray, eos_id: int) -> np.ndarray:
    """Megatron corpora made with --append-eod end documents with EOS; the loader adds its own."""
    return tokens[:-1] if tokens.size and tokens[-1] == eos_id else tokens


def _job_done(out: Path, job: Job) -> dict | None:
    path = out / JOBS_DIR / f"{job.index:05d}.json"
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ok = all((out / s["name"]).is_file() and (out / s["name"]).stat().st_size == s["bytes"] for s in record["shards"])
    return record if ok else None


def _check_settings(out: Path, settings: dict) -> None:
    path = out / SETTINGS_FILE
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise DataInputError(path, "settings", "this --out was prepared with other inputs or options",
                             "use a fresh --out, or the same options to resume")
    write_atomic(path, json.dumps(settings, indent=1))


def prepare(cfg: PrepareConfig) -> Manifest:
    """Validate everything up front, run pending jobs (in parallel), then write the manifest."""
    if cfg.input_format not in ("auto", *FORMATS):
        raise DataInputError(cfg.input_format, "--format", "unknown", f"use one of auto, {', '.join(FORMATS)}")
    inputs = resolve_inputs(cfg.inputs, cfg.input_format)
    for inp in inputs:
        check_text_field(inp, cfg.text_field)
    tok = load_tokenizer(cfg.tokenizer)
    out = Path(cfg.out)
    (out / JOBS_DIR).mkdir(parents=True, exist_ok=True)
    settings = {"inputs": [[str(i.path), i.format, i.size] for i in inputs], "tokenizer": asdict(tok.identity),
                "text_field": cfg.text_field, "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction,
                "job_bytes": cfg.job_bytes}
    _check_settings(out, settings)
    if isinstance(tok, JsonTokenizer) and tok.path.resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tok.path, out / TOKENIZER_FILE)

    jobs = plan_jobs(inputs, cfg.job_bytes)
    records = {j.index: r for j in jobs if (r := _job_done(out, j)) is not None}
    pending = [j for j in jobs if j.index not in records]
    bar = tqdm(total=sum(i.size for j in pending for i in j.inputs), unit="B", unit_scale=True,
               desc=f"prepare {out.name}", disable=not cfg.progress or not pending, file=sys.stderr)
    if cfg.workers <= 1 or len(pending) <= 1:
        for job in pending:
            records[job.index] = run_job(job, cfg, tok)
            bar.update(sum(i.size for i in job.inputs))
    else:
        with ProcessPoolExecutor(min(cfg.workers, len(pending)), mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(run_job, j, cfg, tok): j for j in pending}
            for fut in as_completed(futures):
                records[futures[fut].index] = fut.result()
                bar.update(sum(i.size for i in futures[fut].inputs))
    bar.close()

    skipped: Counter = Counter()
    shards: list[ShardInfo] = []
    for index in sorted(records):
        skipped.update(records[index]["skipped"])
        shards += [ShardInfo(**s) for s in records[index]["shards"]]
    if not any(s.split == "train" and s.num_docs for s in shards):
        raise DataInputError(cfg.inputs, "--input", f"no usable documents (skipped: {dict(skipped)})",
                             "check --text-field, --format and the files' contents")
    manifest = Manifest(tokenizer=tok.identity, dtype=dtype_for_vocab(tok.vocab_size), val_fraction=cfg.val_fraction,
                        shards=sorted(shards, key=lambda s: s.name), skipped=dict(sorted(skipped.items())),
                        inputs=[str(i.path) for i in inputs])
    write_manifest(out, manifest)
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="+", required=True, help="files, dirs or globs")
    p.add_argument("--tokenizer", required=True, help="path/to/tokenizer.json or 'byte'")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--text-field", default="text")
    p.add_argument("--shard-tokens", type=int, default=PrepareConfig.shard_tokens)
    p.add_argument("--val-fraction", type=float, default=PrepareConfig.val_fraction)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), dest="input_format")
    p.add_argument("--job-bytes", type=int, default=PrepareConfig.job_bytes)
    a = p.parse_args(argv)
    try:
        m = prepare(PrepareConfig(a.input, a.tokenizer, a.out, a.text_field, a.shard_tokens, a.val_fraction,
                                  a.workers, a.input_format, a.job_bytes))
    except DataInputError as exc:
        sys.exit(f"error: {exc}")
    for split in ("train", "val"):
        sh = m.split_shards(split)
        print(f"{split}: {len(sh)} shards, {sum(s.num_docs for s in sh)} docs, {sum(s.num_tokens for s in sh)} tokens")
    if m.skipped:
        print(f"skipped: {m.skipped}")


if __name__ == "__main__":
    main()
