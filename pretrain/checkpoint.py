"""Atomic, resumable DCP checkpoints in RUN_DIR/checkpoints.

Layout of one checkpoint `step_00001000/`:
  DCP files (.metadata, __*_*.distcp)  model and optimizer, sharded as they were in memory
  train_state.pt                       step, scheduler, data-loader and RNG state of every rank
  config.toml                          the resolved run config (readable, reusable with --config)
  model_config.json                    the ModelConfig the weights belong to (export, init_from)
  COMPLETE.json                        written last: every file with its size

A save writes into `.tmp-step_00001000/` and is renamed into place only after COMPLETE.json is
written, so a crash mid-save leaves nothing that resume would pick. Resume also re-checks file
sizes against COMPLETE.json, so a checkpoint later truncated or missing a file is skipped.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from parallel.distributed import all_gather_objects, all_reduce_scalar, barrier, new_cpu_group

log = logging.getLogger(__name__)
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def _quiet_dcp(fn, *args, **kwargs):
    """DCP warns on every single-process save/load; single-process is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        return fn(*args, **kwargs)

MARKER = "COMPLETE.json"
TRAIN_STATE = "train_state.pt"
CONFIG_FILE = "config.toml"
MODEL_CONFIG_FILE = "model_config.json"


def model_config_json(model_config: Any) -> str:
    """The MODEL_CONFIG_FILE text of a ModelConfig (read back with ModelConfig.from_dict)."""
    return json.dumps(model_config.to_dict(), indent=1)
_NAME = re.compile(r"^step_(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else the reason it is not."""
    marker = path / MARKER
    if not marker.is_file():
        return f"no {MARKER} (save never finished)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MARKER} ({e})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size} (truncated)"
    return None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (complete or not: see verify_checkpoint)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def find_latest_complete(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are reported and passed over."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, reason)
    return None


@dataclass
class _Pending:
    tmp: Path
    final: Path
    future: Future | None


class CheckpointManager:
    """Saves (optionally async) and commits checkpoints; every rank calls every method.

    `committed` is the newest checkpoint this manager has committed: only a committed checkpoint
    may be reported (summary.json, guard messages), since an uncommitted one is never resumed from.
    """

    def __init__(self, ckpt_dir: Path, keep: int, async_save: bool, is_main: bool):
        self.dir = ckpt_dir
        self.keep = keep
        self.async_save = async_save
        self.is_main = is_main
        self.committed: Path | None = None
        self._pending: _Pending | None = None
        # The async writer thread's collectives get their own group, so that they cannot
        # interleave with the training loop's collectives on the default group (poll() among them).
        self._async_group = new_cpu_group() if async_save else None
        if is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-*"):  # leftovers of a save that was interrupted
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def save(self, step: int, dcp_state: dict[str, Any], rank_state: dict[str, Any],
             shared_state: dict[str, Any], texts: dict[str, str]) -> Path:
        """Write checkpoint `step`. `rank_state` differs per rank (RNG, loader); `shared_state` and
        `texts` (file name -> content: config.toml, model_config.json) do not. Returns the path
        the checkpoint has once committed: at once for a sync save; for an async one in a later
        `poll()` or `wait()`."""
        self.wait()
        final = self.dir / checkpoint_name(step)
        if final.exists():
            self.committed = final
            return final
        tmp = self.dir / f".tmp-{final.name}"
        rank_states = all_gather_objects(rank_state)
        if self.is_main:
            tmp.mkdir(parents=True)
            torch.save({**shared_state, "ranks": rank_states}, tmp / TRAIN_STATE)
            for name, text in texts.items():
                (tmp / name).write_text(text)
        barrier()
        if self.async_save:
            future = _quiet_dcp(dcp.async_save, dcp_state, checkpoint_id=str(tmp), process_group=self._async_group)
            self._pending = _Pending(tmp, final, future)
        else:
            _quiet_dcp(dcp.save, dcp_state, checkpoint_id=str(tmp))
            self._pending = _Pending(tmp, final, None)
            self.wait()
        return final

    def poll(self) -> bool:
        """Commit the async save in flight if every rank has finished writing it; never blocks on
        the write. Call once per step: a save is then committed about one step after its write ends,
        not at the next save. While a save is in flight this is collective (all ranks must agree
        it is done on every rank before rank 0 commits). True when it committed."""
        pending = self._pending
        if pending is None:
            return False
        done = pending.future is None or pending.future.done()
        if all_reduce_scalar(1.0 if done else 0.0, "min") < 1.0:
            return False
        self.wait()
        return True

    def wait(self) -> None:
        """Finish and commit the save in flight, if any."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if pending.future is not None:
            pending.future.result()
        barrier()  # every rank's shards are on disk
        if self.is_main:
            commit(pending.tmp, pending.final)
            self._prune()
            log.info("checkpoint saved: %s", pending.final)
        barrier()
        self.committed = pending.final

    def _prune(self) -> None:
        complete = [p for p in list_checkpoints(self.dir) if verify_checkpoint(p) is None]
        for old in complete[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, dcp_state: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Load DCP tensors in place into `dcp_state`; return (shared state, list of per-rank states)."""
        _quiet_dcp(dcp.load, dcp_state, checkpoint_id=str(path))
        state = torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=False)
        ranks = state.pop("ranks")
        return state, ranks


def commit(tmp: Path, final: Path) -> None:
    """Seal a fully written checkpoint directory: list its files in the marker, then rename."""
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / MARKER).write_text(json.dumps({"files": files}, indent=1))
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def save_model_weights(tmp: Path, model_state: dict[str, Any]) -> None:
    """Write a weights-only checkpoint's tensors (single process); `commit` seals it."""
    _quiet_dcp(dcp.save, {"model": model_state}, checkpoint_id=str(tmp))


def load_model_weights(path: Path, model_state: dict[str, Any]) -> None:
    """Load only the model's tensors (in place) from a checkpoint, resharding as needed.

    Names and global shapes are checked first, so a mismatch says which tensors differ instead
    of failing inside DCP."""
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"{path}: not a complete checkpoint ({reason}); point at a step_* directory")
    saved = {k.removeprefix("model."): tuple(m.size)
             for k, m in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
             if k.startswith("model.") and hasattr(m, "size")}
    ours = {k: tuple(v.shape) for k, v in model_state.items()}
    problems = [f"{k} missing" for k in ours if k not in saved] + \
               [f"{k} is {saved[k]} in the checkpoint, {ours[k]} here" for k in ours if k in saved and saved[k] != ours[k]]
    if problems:
        raise ValueError(f"{path}: weights do not fit this model ({len(problems)} tensors, e.g. "
                         f"{'; '.join(problems[:3])}); build the model of {path / MODEL_CONFIG_FILE}")
    _quiet_dcp(dcp.load, {"model": model_state}, checkpoint_id=str(path))


def _fsync_dir(path: Path) -> None:
    """Make a rename or new files durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
