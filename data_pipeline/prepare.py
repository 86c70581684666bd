"""`python -m data_pipeline.prepare`: raw text -> tokenized WebDataset shards + manifest.

Work is cut into jobs (consecutive input files up to `job_bytes`); each job writes its own shards
and, last, a small record in `.jobs/`. A re-run skips jobs whose record and shards exist, so an
interrupted prepare resumes; the manifest is written once all jobs are done, atomically.

Damaged input (data_pipeline.inputs has the policy) is skipped, counted by kind and named in the
summary and the manifest (`skipped`, `skipped_files`); a truncated file is always reported with
the number of documents read before the cut. `--strict` makes any skip a one-line error (exit 2).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_pipeline.errors import DataInputError
from data_pipeline.files import make_dir, write_atomic
from data_pipeline.inputs import (FILE_KINDS, FORMATS, FileProblem, InputFile, iter_located_documents,
                                  probe_input, resolve_inputs, strict_record_error)
from data_pipeline.manifest import MANIFEST_FILE, Manifest, ShardInfo, dtype_for_vocab, write_manifest
from data_pipeline.shard_io import ShardWriter
from data_pipeline.split import is_validation
from data_pipeline.tokenizer import (BOS_CANDIDATES, EOS_CANDIDATES, TOKENIZER_FILE, JsonTokenizer, Tokenizer,
                                     load_tokenizer)

log = logging.getLogger(__name__)
JOBS_DIR = ".jobs"
LOCK_FILE = ".lock"
SETTINGS_FILE = "prepare_settings.json"
ENCODE_BATCH = 256


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str  # "byte" or a tokenizer.json
    out: Path
    bos_token: str | None = None  # a tokenizer.json's special tokens, where not the usual names
    eos_token: str | None = None
    text_field: str = "text"
    shard_tokens: int = 1 << 24  # 32 MiB of uint16 per shard: many shards per canonical stream
    val_fraction: float = 0.005
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    input_format: str = "auto"
    job_bytes: int = 256 << 20  # raw input bytes per job: the unit of parallelism and of resume
    progress: bool = True
    strict: bool = False  # any skipped record or file is an error (not in the settings: output is the same)


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


class _DamagedMidJob(Exception):
    """A file turned out damaged after some of it was written: the job starts over without it."""

    def __init__(self, inp: InputFile, problem: FileProblem, found: dict[InputFile, FileProblem]):
        super().__init__(inp, problem, found)
        self.inp, self.problem, self.found = inp, problem, found  # found: damaged files the attempt skipped


def run_job(job: Job, cfg: PrepareConfig, tok: Tokenizer) -> dict:
    """Tokenize one job's documents into train/val shards; return the record written to .jobs/.

    A file found damaged mid-stream (not merely cut) is dropped whole: the job's shards so far are
    deleted and the job runs again without it, so its output is that of a run without the file.
    """
    excluded: dict[InputFile, FileProblem] = {}
    while True:
        try:
            return _run_job_once(job, cfg, tok, excluded)
        except _DamagedMidJob as exc:
            log.warning("%s: %s; job %05d starts over without it", exc.inp.path, exc.problem.problem, job.index)
            excluded |= exc.found | {exc.inp: exc.problem}


def _run_job_once(job: Job, cfg: PrepareConfig, tok: Tokenizer, excluded: dict[InputFile, FileProblem]) -> dict:
    out, prefix = Path(cfg.out), f"{job.index:05d}"
    dtype = dtype_for_vocab(tok.vocab_size)
    writers = {s: ShardWriter(out, prefix, s, dtype, cfg.shard_tokens) for s in ("train", "val")}
    skipped: Counter = Counter(p.kind for p in excluded.values())
    files = [p.record(inp.path) for inp, p in excluded.items()]  # damaged / truncated inputs of this job
    by_input = {str(inp.path): {p.kind: 1} for inp, p in excluded.items()}  # per input file: its skips
    damaged: dict[InputFile, FileProblem] = {}  # found in this attempt, nothing of them written
    n_docs = 0

    def flush(inp: InputFile, batch: list[tuple[str, str | np.ndarray]]) -> None:
        nonlocal n_docs
        texts = [d for _, d in batch if isinstance(d, str)]
        encoded = iter(tok.encode_batch(texts)) if texts else iter(())
        for where, doc in batch:
            ids = np.asarray(next(encoded) if isinstance(doc, str) else _strip_eos(doc, tok.eos_id), np.int64)
            reason = ("empty_docs" if ids.size == 0 else
                      "out_of_range_ids" if ids.min() < 0 or ids.max() >= tok.vocab_size else None)
            if reason and cfg.strict:
                raise strict_record_error(inp.path, f"{where} (after tokenizing)", reason)
            if reason:
                skipped[reason] += 1
            else:
                split = "val" if is_validation(doc, cfg.val_fraction) else "train"
                writers[split].write(f"{prefix}-{n_docs:09d}", ids)
                n_docs += 1

    for inp in job.inputs:
        if inp in excluded:
            continue
        before, written_before = Counter(skipped), n_docs
        batch: list[tuple[str, str | np.ndarray]] = []
        problem = None
        try:
            for located in iter_located_documents(inp, cfg.text_field, skipped, cfg.strict):
                batch.append(located)
                if len(batch) == ENCODE_BATCH:
                    flush(inp, batch)
                    batch = []
        except FileProblem as exc:
            if cfg.strict:
                raise exc.strict_error(inp.path) from None
            problem = exc
        if problem is not None and problem.kind == "damaged_files":
            if n_docs != written_before or skipped != before:
                for w in writers.values():  # some of this job's output comes from the damaged file
                    w.close()
                    for shard in w.finished:
                        (out / shard.name).unlink(missing_ok=True)
                raise _DamagedMidJob(inp, problem, damaged)
            batch = []  # a damaged file is dropped whole: its documents read so far go nowhere
        flush(inp, batch)
        if skipped != before:
            log.warning("%s: skipped documents %s", inp.path, dict(skipped - before))
        if problem is not None:
            if problem.kind == "damaged_files":
                damaged[inp] = problem
            skipped[problem.kind] += 1
            files.append(problem.record(inp.path))
            log.warning("%s: %s", inp.path, problem.problem)
        if skipped != before:
            by_input[str(inp.path)] = dict(skipped - before)
    for w in writers.values():
        w.close()
    shards = [asdict(s) for w in writers.values() for s in w.finished]
    record = {"inputs": [str(i.path) for i in job.inputs], "shards": shards, "skipped": dict(skipped),
              "files": sorted(files, key=lambda f: f["path"]), "skipped_by_input": by_input}
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


# The options behind each setting, for the message that refuses a changed one.
SETTING_OPTIONS = {"inputs": "--input (files, or their sizes)", "tokenizer": "--tokenizer/--bos-token/--eos-token",
                   "text_field": "--text-field", "shard_tokens": "--shard-tokens", "val_fraction": "--val-fraction",
                   "job_bytes": "--job-bytes"}


def _check_settings(out: Path, settings: dict) -> None:
    """A re-run resumes only with the settings the jobs already done were written with."""
    path = out / SETTINGS_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [k for k in SETTING_OPTIONS if before.get(k) != settings[k]]
        if changed:
            said = [SETTING_OPTIONS[k] + (f" ({before.get(k)} then, {settings[k]} now)"
                                          if not isinstance(settings[k], (list, dict)) else "") for k in changed]
            raise DataInputError(path, "settings", f"this --out was prepared with other {', '.join(said)}",
                                 "use a fresh --out, or the same options to resume")
    write_atomic(path, json.dumps(settings, indent=1))


def _probe_all(inputs: list[InputFile], cfg: PrepareConfig) -> dict[InputFile, FileProblem]:
    """Check every input before any work: option problems raise; empty/unreadable files are set aside."""
    problems: dict[InputFile, FileProblem] = {}
    for inp in inputs:
        problem = probe_input(inp, cfg.text_field)
        if problem is None:
            continue
        if cfg.strict:
            raise problem.strict_error(inp.path)
        log.warning("%s: %s", inp.path, problem.problem)
        problems[inp] = problem
    if len(problems) == len(inputs):
        counts = Counter(p.kind for p in problems.values())
        first = next(iter(problems))
        raise DataInputError(cfg.inputs, "--input", f"every input file was skipped ({dict(counts)}; e.g. "
                             f"{first.path}: {problems[first].problem})", "check the files' contents and --format")
    return problems


def _strict_check_resumed(records: dict[int, dict]) -> None:
    """--strict over jobs an earlier, non-strict run finished: their skips count too."""
    for index in sorted(records):
        r = records[index]
        if r["skipped"]:
            by_input = r.get("skipped_by_input") or {", ".join(r["inputs"]): r["skipped"]}
            path, skips = next(iter(by_input.items()))
            raise DataInputError(path, "skipped", f"{skips} in job {index:05d}, done by an earlier run without "
                                 "--strict (--strict)", "repair the file and prepare into a fresh --out, "
                                 "or drop --strict to accept the skips")


def _skipped_files(start: dict[InputFile, FileProblem], records: dict[int, dict]) -> dict[str, list[dict]]:
    """Skipped, cut or damaged files by kind, each {path, problem, docs_kept}, sorted by path."""
    found = [p.record(inp.path) for inp, p in start.items()] + [f for r in records.values() for f in r.get("files", [])]
    out: dict[str, list[dict]] = {}
    for f in sorted(found, key=lambda f: f["path"]):
        out.setdefault(f["kind"], []).append({k: v for k, v in f.items() if k != "kind"})
    return {k: out[k] for k in FILE_KINDS if k in out}


def prepare(cfg: PrepareConfig) -> Manifest:
    """Validate everything up front, run pending jobs (in parallel), then write the manifest."""
    if cfg.input_format not in ("auto", *FORMATS):
        raise DataInputError(cfg.input_format, "--format", "unknown", f"use one of auto, {', '.join(FORMATS)}")
    if not 0 <= cfg.val_fraction < 1:
        raise DataInputError(cfg.val_fraction, "--val-fraction", "not in [0, 1)", "pass e.g. 0.005")
    for name, value in (("--shard-tokens", cfg.shard_tokens), ("--job-bytes", cfg.job_bytes),
                        ("--workers", cfg.workers)):
        if value < 1:
            raise DataInputError(value, name, "not positive", "pass a positive integer")
    out = Path(cfg.out)
    if not str(cfg.out).strip() or out == Path("."):
        raise DataInputError(repr(str(cfg.out)), "--out", "the current directory (an empty or '.' path)",
                             "pass a directory of its own for the shards and manifest")
    inputs = resolve_inputs(cfg.inputs, cfg.input_format, exclude=out)
    start_problems = _probe_all(inputs, cfg)
    if (cfg.bos_token or cfg.eos_token) and (cfg.tokenizer == "byte" or Path(cfg.tokenizer).is_dir()):
        raise DataInputError(cfg.tokenizer, "--bos-token/--eos-token", "name special tokens of a tokenizer.json "
                             "only (the byte tokenizer and a prepared dir have theirs)", "drop them")
    tok = load_tokenizer(cfg.tokenizer, cfg.bos_token, cfg.eos_token)
    make_dir(out)
    with exclusive(out):
        return _prepare_into(out, cfg, inputs, start_problems, tok)


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold OUT/.lock while preparing: a second prepare into the same directory stops at start
    instead of writing the same shard files (two writers corrupt them)."""
    with open(out / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise DataInputError(out, "--out", "another prepare is writing into this directory",
                                 "wait for it to finish (or stop it), then run again to resume") from None
        yield


def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux a worker is killed when the prepare that started it dies (even by
    kill -9), rather than going on writing into --out beside the next run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: workers end when their queue closes
        return
    if os.getppid() != parent:  # the parent died before the call above
        os._exit(1)


def _prepare_into(out: Path, cfg: PrepareConfig, inputs: list[InputFile],
                  start_problems: dict[InputFile, FileProblem], tok: Tokenizer) -> Manifest:
    (out / JOBS_DIR).mkdir(exist_ok=True)
    settings = {"inputs": [[str(i.path), i.format, i.size] for i in inputs], "tokenizer": asdict(tok.identity),
                "text_field": cfg.text_field, "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction,
                "job_bytes": cfg.job_bytes}
    _check_settings(out, settings)
    if isinstance(tok, JsonTokenizer) and tok.path.resolve() != (out / TOKENIZER_FILE).resolve():
        shutil.copyfile(tok.path, out / TOKENIZER_FILE)

    jobs = plan_jobs([i for i in inputs if i not in start_problems], cfg.job_bytes)
    records = {j.index: r for j in jobs if (r := _job_done(out, j)) is not None}
    if cfg.strict:
        _strict_check_resumed(records)
    pending = [j for j in jobs if j.index not in records]
    bar = tqdm(total=sum(i.size for j in pending for i in j.inputs), unit="B", unit_scale=True,
               desc=f"prepare {out.name}", disable=not cfg.progress or not pending, file=sys.stderr)
    try:
        if cfg.workers <= 1 or len(pending) <= 1:
            for job in pending:
                records[job.index] = run_job(job, cfg, tok)
                bar.update(sum(i.size for i in job.inputs))
        else:
            with ProcessPoolExecutor(min(cfg.workers, len(pending)), mp_context=get_context("spawn"),
                                     initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
                futures = {pool.submit(run_job, j, cfg, tok): j for j in pending}
                try:
                    for fut in as_completed(futures):
                        records[futures[fut].index] = fut.result()
                        bar.update(sum(i.size for i in futures[fut].inputs))
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)  # running jobs finish (and can be resumed)
                    raise
    finally:
        bar.close()  # ends the bar's line, so an error prints on its own

    skipped: Counter = Counter(p.kind for p in start_problems.values())
    shards: list[ShardInfo] = []
    for index in sorted(records):
        skipped.update(records[index]["skipped"])
        shards += [ShardInfo(**s) for s in records[index]["shards"]]
    skipped_files = _skipped_files(start_problems, records)
    if not any(s.split == "train" and s.num_docs for s in shards):
        val_docs = sum(s.num_docs for s in shards if s.split == "val")
        if val_docs:
            raise DataInputError(cfg.val_fraction, "--val-fraction", f"every one of the {val_docs} usable documents "
                                 "went to the validation split: the training split is empty",
                                 "lower --val-fraction (into a fresh --out), or add documents")
        raise DataInputError(cfg.inputs, "--input", f"no usable documents (skipped: {dict(skipped)})",
                             "check --text-field, --format and the files' contents")
    train_docs = sum(s.num_docs for s in shards if s.split == "train")
    if cfg.val_fraction > 0 and not any(s.split == "val" and s.num_docs for s in shards):
        log.warning("prepare %s: the validation split is empty (--val-fraction %g of %d documents expects %.1f); "
                    "validation during training will have nothing to read: raise --val-fraction into a fresh --out",
                    out, cfg.val_fraction, train_docs, cfg.val_fraction * train_docs)
    manifest = Manifest(tokenizer=tok.identity, dtype=dtype_for_vocab(tok.vocab_size), val_fraction=cfg.val_fraction,
                        shards=sorted(shards, key=lambda s: s.name), skipped=dict(sorted(skipped.items())),
                        inputs=[str(i.path) for i in inputs], skipped_files=skipped_files)
    write_manifest(out, manifest)
    if skipped_files:  # a recap in this process: workers' warnings may have scrolled by
        log.warning("prepare %s: input files skipped or cut: %s; they are listed in the summary and under "
                    "skipped_files in %s", out, {k: len(v) for k, v in skipped_files.items()}, MANIFEST_FILE)
    return manifest


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default; a required option says so instead of "None", and
    an option without a default (its help says what happens then) says nothing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:
            return f"{action.help} (required)"
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def summary_lines(m: Manifest, limit: int = 20) -> list[str]:
    """What the CLI prints at the end: per split, what was skipped, and every skipped/cut file by kind."""
    lines = []
    for split in ("train", "val"):
        sh = m.split_shards(split)
        lines.append(f"{split}: {len(sh)} shards, {sum(s.num_docs for s in sh)} docs, "
                     f"{sum(s.num_tokens for s in sh)} tokens")
    if m.skipped:
        lines.append(f"skipped: {m.skipped}")
    for kind, files in m.skipped_files.items():
        lines.append(f"{kind} ({len(files)}):")
        lines += [f"  {f['path']}: {f['problem']}" for f in files[:limit]]
        if len(files) > limit:
            lines.append(f"  ... and {len(files) - limit} more (manifest.json: skipped_files)")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.prepare", formatter_class=_HelpFormatter,
                                description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="input files, directories (read recursively) or quoted globs: .jsonl[.gz|.zst], "
                        ".parquet, .txt, Megatron PREFIX.bin/.idx")
    p.add_argument("--tokenizer", required=True, help="path/to/tokenizer.json, or 'byte' for the byte tokenizer")
    p.add_argument("--bos-token", help="the tokenizer.json's special token that starts a document; without it, the "
                                       f"first of {', '.join(BOS_CANDIDATES)} it has, else the EOS token")
    p.add_argument("--eos-token", help="the tokenizer.json's special token that ends a document; without it, the "
                                       f"first of {', '.join(EOS_CANDIDATES)} it has")
    p.add_argument("--out", required=True, type=Path,
                   help="output dir for shards + manifest.json; re-running into it resumes an interrupted prepare")
    p.add_argument("--text-field", default="text", help="the JSON key / parquet column holding the text")
    p.add_argument("--shard-tokens", type=int, default=PrepareConfig.shard_tokens,
                   help="tokens per shard before rolling over to the next")
    p.add_argument("--val-fraction", type=float, default=PrepareConfig.val_fraction,
                   help="fraction of documents (chosen by content hash) in the validation split")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="worker processes, one job each at a time (default: this machine's CPU count, %(default)s)")
    p.add_argument("--format", default="auto", choices=("auto", *FORMATS), dest="input_format",
                   help="input format; auto detects it from each file name")
    p.add_argument("--job-bytes", type=int, default=PrepareConfig.job_bytes,
                   help="raw input bytes per job: the unit of parallelism and of resume")
    p.add_argument("--strict", action="store_true",
                   help="stop with a one-line error (exit 2) at the first skipped record or file (empty, "
                        "damaged, truncated, bad line) instead of skipping, counting and reporting it")
    a = p.parse_args(argv)
    try:
        m = prepare(PrepareConfig(inputs=a.input, tokenizer=a.tokenizer, out=a.out, bos_token=a.bos_token,
                                  eos_token=a.eos_token, text_field=a.text_field,
                                  shard_tokens=a.shard_tokens, val_fraction=a.val_fraction, workers=a.workers,
                                  input_format=a.input_format, job_bytes=a.job_bytes, strict=a.strict))
    except DataInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(summary_lines(m)))


if __name__ == "__main__":
    main()
