"""Observability: TensorBoard scalars, a JSONL metrics log, and the rank-0 progress line.

metrics.jsonl holds one JSON object per logged step with floats written exactly (repr), so
scripts and tests can compare loss curves bit for bit across resumes; a non-finite value (a skipped
step's loss) is null, so that strict JSON readers take every line. A resumed run first moves the
rows it is about to redo (logged after its checkpoint by the segment that crashed, or by the
trajectory a rewind left) to metrics.superseded.jsonl, and TensorBoard purges the same steps, so
both describe one trajectory with one row per step.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
import torch

from data_pipeline.files import write_atomic
from pretrain.summary import finite_or_null

log = logging.getLogger("pretrain")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Console on rank 0 (warnings on others), plus a per-rank log file, every line tagged with the rank."""
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_pretrain", False):
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    file = logging.FileHandler(logs / f"rank{rank}.log")
    file.setLevel(logging.INFO)
    for h in (console, file):
        h.setFormatter(fmt)
        h._pretrain = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO)


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"


def set_aside_rows_after(run_dir: Path, step: int) -> int:
    """Move metrics.jsonl's rows of steps after `step` (-1: every row), and any line cut mid-write,
    to the end of metrics.superseded.jsonl; returns how many moved. The moved rows are appended
    (and flushed to disk) before metrics.jsonl is replaced atomically: a crash in between repeats
    rows, never loses one."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return 0
    keep: list[str] = []
    moved: list[str] = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row_step = json.loads(line)["step"] if line.endswith("\n") else None
        except (ValueError, KeyError, TypeError):
            row_step = None
        (keep if isinstance(row_step, int) and row_step <= step else moved).append(line)
    if not moved:
        return 0
    with open(run_dir / SUPERSEDED_FILE, "a") as f:
        f.writelines(line if line.endswith("\n") else line + "\n" for line in moved)
        f.flush()
        os.fsync(f.fileno())
    write_atomic(path, "".join(keep))
    return len(moved)


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger so callers need no rank checks. Nothing is
    written before `open`, which the trainer calls once it knows the step it continues from."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, flops_per_token: float,
                 peak_flops_total: float, total_steps: int):
        self.run_dir = run_dir
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.total_steps = total_steps
        self.writer = None
        self.jsonl = None
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._window_steps = 0

    def open(self, continues_after: int) -> None:
        """Start logging a trajectory that continues after step `continues_after` (-1: a fresh
        start): rows and TensorBoard events of later steps belong to a run it replaces."""
        if not self.enabled:
            return
        moved = set_aside_rows_after(self.run_dir, continues_after)
        if moved:
            log.warning("moved %d row(s) of metrics.jsonl logged after step %d (steps this run redoes, or a line cut "
                        "mid-write) to %s", moved, continues_after, SUPERSEDED_FILE)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=continues_after + 1)
        self.jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1)

    def throughput(self, tokens: int) -> tuple[float, float]:
        """Add tokens of a finished step; (tokens/s, MFU) over the window since the last log."""
        self._window_tokens += tokens
        self._window_steps += 1
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        tps = self._window_tokens / elapsed
        return tps, tps * self.flops_per_token / self.peak_flops_total

    def reset_window(self) -> None:
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        self._window_steps = 0

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Leave the time spent inside out of the window (validation, a checkpoint's save or
        commit): tokens/s, MFU and the ETA measure training steps only."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._window_start += time.perf_counter() - start

    def step_time(self) -> float:
        return (time.perf_counter() - self._window_start) / max(self._window_steps, 1)

    def log(self, step: int, scalars: dict[str, float], progress: bool = True) -> None:
        if self.jsonl is None:
            return
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps(finite_or_null({"step": step, **scalars}), allow_nan=False) + "\n")
        if progress and "train/loss" in scalars:
            eta = self.step_time() * (self.total_steps - step)
            log.info("step %d/%d | loss %.4f | lr %.2e | gnorm %.3f | %s tok/s | MFU %.1f%% | mem %.1f GiB | ETA %s",
                     step, self.total_steps, scalars["train/loss"], scalars.get("train/lr", 0.0),
                     scalars.get("train/grad_norm", float("nan")), _si(scalars.get("perf/tokens_per_s", 0.0)),
                     100 * scalars.get("perf/mfu", 0.0), scalars.get("perf/memory_gib", 0.0),
                     format_duration(eta))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _si(x: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def moe_balance_scalars(loads: list[torch.Tensor]) -> dict[str, float]:
    """Max-over-mean expert load (token counts or fractions per expert) per layer and overall:
    1.0 is balanced."""
    out: dict[str, float] = {}
    worst = 0.0
    for i, load in enumerate(loads):
        load = load.detach().float().cpu()
        ratio = float(load.max() / load.mean().clamp_min(1e-12))
        out[f"moe/max_over_mean_load/{i}"] = ratio
        worst = max(worst, ratio)
    if loads:
        out["moe/max_over_mean_load"] = worst
    return out
