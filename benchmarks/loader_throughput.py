"""Loader throughput in tokens/s per process, on the demo corpus and a synthetic ~1 GB corpus.

A measurement, not a test: `python benchmarks/loader_throughput.py [--seconds S] [--json PATH]`.
Corpora are built under /tmp on first use (demo: stdlib BPE; synthetic: random ids, log-normal
document lengths (mean ~900 tokens), 32K vocabulary, uint16); each configuration is timed
from loader construction in a process of its own, so the figure includes opening, hashing and
indexing every shard read (no shard indexed by an earlier row is in the process's cache; the first
batch waits for all 64 streams' first shards; the time to it is reported too).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from data_pipeline.demo_corpus import build_demo_corpus
from data_pipeline.loader import build_train_loader
from data_pipeline.manifest import MANIFEST_FILE, Manifest, write_manifest
from data_pipeline.shard_io import ShardWriter
from data_pipeline.tokenizer import TokenizerIdentity


def build_synthetic(out: Path, total_bytes: int, vocab: int = 32000, seed: int = 0) -> Path:
    """Random token documents (mean ~1K tokens) written through the same ShardWriter as prepare."""
    if (out / MANIFEST_FILE).is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    writer = ShardWriter(out, "00000", "train", "uint16", 1 << 23)
    written, i = 0, 0
    while written < total_bytes // 2:
        doc = rng.integers(2, vocab, int(rng.lognormal(6.5, 0.8)) + 1, dtype=np.uint16)
        writer.write(f"00000-{i:09d}", doc)
        written, i = written + len(doc), i + 1
    writer.close()
    ident = TokenizerIdentity("synthetic", "synthetic", vocab, 0, 1)
    write_manifest(out, Manifest(ident, "uint16", 0.0, writer.finished))
    return out


def measure(path: Path, seq_len: int, batch: int, workers: int, seconds: float, verify: bool) -> dict:
    """Sustained rate from loader construction: includes opening (and hashing) every shard it reads."""
    t0 = time.perf_counter()
    it = iter(build_train_loader([(str(path), 1.0)], seq_len, batch, num_workers=workers, verify_checksums=verify))
    n = next(it)["tokens"].numel()
    first = time.perf_counter() - t0
    while time.perf_counter() - t0 < seconds:
        n += next(it)["tokens"].numel()
    dt = time.perf_counter() - t0
    return {"corpus": path.name, "seq_len": seq_len, "batch": batch, "num_workers": workers,
            "verify_checksums": verify, "tokens": n, "seconds": round(dt, 2), "first_batch_s": round(first, 2),
            "tokens_per_s": round(n / dt)}


def measure_fresh(*args) -> dict:
    """`measure` in a new process: `read_shard` caches indexed shards per process, which would
    spare a row the work of the rows before it. The process is spawned (a fork would inherit the
    cache) and forks its DataLoader workers, as a trainer does (spawned, they import torch first)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_fork_workers) as pool:
        return pool.submit(measure, *args).result()


def _fork_workers() -> None:
    multiprocessing.set_start_method("fork", force=True)  # a spawned process inherits "spawn"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=10.0, help="timed seconds per configuration")
    p.add_argument("--synthetic-bytes", type=int, default=1 << 30)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/loader_bench"))
    p.add_argument("--json", type=Path, default=Path("runs/bench/loader_throughput.json"))
    a = p.parse_args()
    t0 = time.perf_counter()
    demo = build_demo_corpus(a.workdir / "demo")
    t_demo = time.perf_counter() - t0
    t0 = time.perf_counter()
    synth = build_synthetic(a.workdir / "synthetic", a.synthetic_bytes)
    t_synth = time.perf_counter() - t0
    rows = [measure_fresh(demo, seq, 8, w, a.seconds, True) for seq in (2048, 8192) for w in (0, 1)]
    rows += [measure_fresh(synth, 8192, 8, w, 3 * a.seconds, v) for w, v in ((0, True), (1, True), (0, False))]
    print(f"{'corpus':<10} {'seq_len':>7} {'batch':>5} {'workers':>7} {'sha256':>6} {'Mtok/s':>7} "
          f"{'1st batch s':>11} {'Mtok read':>9}")
    for r in rows:
        print(f"{r['corpus']:<10} {r['seq_len']:>7} {r['batch']:>5} {r['num_workers']:>7} "
              f"{'yes' if r['verify_checksums'] else 'no':>6} {r['tokens_per_s'] / 1e6:>7.1f} "
              f"{r['first_batch_s']:>11.1f} {r['tokens'] / 1e6:>9.0f}")
    report = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.platform(),
              "cpus": os.cpu_count(), "python": platform.python_version(), "build_seconds": {
                  "demo_corpus": round(t_demo, 1), "synthetic": round(t_synth, 1)},
              "synthetic_bytes": sum(f.stat().st_size for f in synth.glob("*.tar")), "results": rows}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
