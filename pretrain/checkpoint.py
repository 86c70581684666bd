"""Atomic, verified, resumable DCP checkpoints in RUN_DIR/checkpoints.

Layout of one checkpoint `step_00001000/`:
  DCP files (.metadata, __*_*.distcp)  model and optimizer, sharded as they were in memory
  train_state.json                     step, scheduler, data-loader and RNG state of every rank,
                                       and the software the run used (plain JSON: no pickle)
  config.toml                          the resolved run config (readable, reusable with --config)
  model_config.json                    the ModelConfig the weights belong to (export, init_from)
  COMPLETE.json                        written last: every file with its size and xxh3-128 hash

A save writes into `.tmp-step_00001000/` and is renamed into place only after COMPLETE.json is
written, so a crash mid-save leaves nothing that resume would pick. Resume verifies every file
against COMPLETE.json (sizes, then hashes shared out over the ranks) and falls back to the
previous checkpoint that verifies. DCP's `.metadata` is a pickle: its hash is checked right before
DCP reads it, so only bytes this stack wrote are ever unpickled. Checkpoint directories are still
trusted input (docs/training.md); weights from elsewhere come in through `pretrain.hf import`.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from parallel.distributed import all_gather_objects, all_reduce_scalar, barrier, broadcast_object, new_cpu_group
from parallel.init import copy_full_into
from pretrain.checkpoint_integrity import (MARKER, CheckpointDamaged, FileRecord, file_digest, share, verify_share,
                                           write_marker)
from pretrain.model.legacy import Split

log = logging.getLogger(__name__)
_SINGLE_PROCESS_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def _quiet_dcp(fn, *args, **kwargs):
    """DCP warns on every single-process save/load; single-process is a supported mode here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        return fn(*args, **kwargs)


TRAIN_STATE = "train_state.json"
CONFIG_FILE = "config.toml"
MODEL_CONFIG_FILE = "model_config.json"
_NAME = re.compile(r"^step_(\d{8,})$")


def model_config_json(model_config: Any) -> str:
    """The MODEL_CONFIG_FILE text of a ModelConfig (read back with ModelConfig.from_saved)."""
    return json.dumps(model_config.to_dict(), indent=1)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete, undamaged checkpoint, else the reason (naming the file).
    Collective when distributed: every rank hashes a share of the files and all get one verdict."""
    rank, world = _rank_and_world()
    reasons = all_gather_objects(verify_share(Path(path), rank, world))
    return next((r for r in reasons if r is not None), None)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (intact or not: see verify_checkpoint)."""
    if not ckpt_dir.is_dir():
        return []
    found = [(step, p) for p in ckpt_dir.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found)]


class NoIntactCheckpoint(ValueError):
    """A run directory has checkpoints but none of them verifies: starting from step 0 in it would
    overwrite them one by one, so the run stops and says what to do."""


def find_latest_complete(ckpt_dir: Path, passed_over: list[tuple[Path, str]] | None = None) -> Path | None:
    """The newest checkpoint that verifies; damaged ones are reported, passed over and appended to
    `passed_over` with the reason; None when there are none. Collective when distributed: rank 0
    lists the candidates (ranks may see a shared directory differently)."""
    candidates = broadcast_object([str(p) for p in reversed(list_checkpoints(ckpt_dir))])
    passed = passed_over if passed_over is not None else []
    for candidate in candidates:
        path = Path(candidate)
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        log.warning("skipping checkpoint %s: %s; trying the previous one", path, reason)
        passed.append((path, reason))
    if candidates:
        newest, reason = passed[-len(candidates)]
        raise NoIntactCheckpoint(
            f"{ckpt_dir}: none of its {len(candidates)} checkpoints verifies (newest: {newest.name}: {reason}); "
            "resume from an intact one with --resume-from, or move the directory aside to start fresh")
    return None


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint directory's name (`step_00001000`), None for another name."""
    m = _NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def origin_key(path: Path | str) -> str:
    """How a run's checkpoints name the `--resume-from` checkpoint their trajectory started from."""
    return str(Path(path).resolve())


def checkpoint_origin(path: Path) -> str | None:
    """The `--resume-from` checkpoint (`origin_key`) the trajectory that wrote `path` started
    from; None for a trajectory that started fresh (or one saved before origins were recorded, or
    a train_state.json this stack did not write: resuming from it says so)."""
    try:
        return json.loads((Path(path) / TRAIN_STATE).read_text()).get("origin")
    except (OSError, ValueError, AttributeError):
        return None


def set_aside(paths: Sequence[Path], ckpt_dir: Path, why: str) -> None:
    """Move checkpoint directories out of the run's listing, into `ckpt_dir/<why>-<UTC time>/`:
    never deleted (they may be all someone has of another trajectory), never resumed from, never
    counted by `checkpoint.keep`. Called by the run that owns the directory (rank 0), once its
    resume has loaded. Housekeeping: a move that fails is reported, not raised (the other ranks
    must not wait for a rank that stopped)."""
    if not paths:
        return
    aside = ckpt_dir / f"{why}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    try:
        aside.mkdir(parents=True)
        for path in paths:
            os.rename(path, aside / path.name)
    except OSError as e:
        log.warning("could not move %s into %s (%s): they stay in the listing", ", ".join(p.name for p in paths),
                    aside, e)
        return
    _fsync_path(ckpt_dir)
    log.warning("moved %s out of %s into %s (%s): kept, but not resumed from or counted by checkpoint.keep",
                ", ".join(p.name for p in paths), ckpt_dir, aside.name, why)


def finish_interrupted_commits(ckpt_dir: Path) -> None:
    """A crash inside `commit` can leave a sealed `.tmp-step_X` (its marker written) beside, or
    instead of, `step_X`: finish the swap when it verifies. Called by the run that owns the
    directory (rank 0), before anything lists or cleans it."""
    for tmp in sorted(ckpt_dir.glob(".tmp-step_*")) if ckpt_dir.is_dir() else []:
        if (tmp / MARKER).is_file() and verify_share(tmp) is None:
            final = tmp.with_name(tmp.name.removeprefix(".tmp-"))
            log.warning("finishing the commit of %s that a crash interrupted", final)
            _swap_into_place(tmp, final)


class CheckpointSaveFailed(RuntimeError):
    """A save could not be written or sealed (a full disk, a quota, an I/O error): its message is
    the one line a user needs."""


def _first_os_error(e: BaseException) -> OSError | None:
    """The first OSError in `e`'s chain, or in the chains of the rank failures a CheckpointException
    gathers (a full disk surfaces from torch's file writer as a RuntimeError raised while handling
    the OSError)."""
    failures = [exc for exc, _ in e.failures.values()] if isinstance(e, CheckpointException) else []
    seen: list[BaseException] = []
    for exc in failures or [e]:
        while exc is not None and exc not in seen:
            if isinstance(exc, OSError):
                return exc
            seen.append(exc)
            exc = exc.__cause__ or exc.__context__
    return None


def _os_error(e: BaseException) -> str | None:
    """What stopped a save, in one line, when it was the filesystem (else None: a bug keeps its
    traceback)."""
    found = _first_os_error(e)
    return None if found is None else f"{type(found).__name__}: {found}"


class _Writer(dcp.FileSystemWriter):
    """DCP's file writer, whose I/O failures reach every rank as the OSError they are. DCP pickles
    each rank's exception to gather it, and pickling drops the chain: the OSError under torch's
    RuntimeError would be lost on every rank but the failing one (which then raised a traceback)."""

    def write_data(self, plan, planner):
        try:
            return super().write_data(plan, planner)
        except Exception as e:
            found = _first_os_error(e)
            if found is None or found is e:
                raise
            plain = OSError(found.errno, found.strerror, found.filename) if found.errno else OSError(str(found))
            raise plain from e


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
        `texts` (file name -> content: config.toml, model_config.json) do not; both states must be
        JSON-serialisable. Returns the path the checkpoint has once committed: at once for a sync
        save; for an async one in a later `poll()` or `wait()`.

        A directory of this step that exists already is replaced once the new one is sealed: it is
        damaged (resume passed over it) or from another trajectory (a run resumed from an older
        step), and in neither case the state of this run."""
        self.wait()
        final = self.dir / checkpoint_name(step)
        pending = _Pending(self.dir / f".tmp-{final.name}", final, None)
        rank_states = all_gather_objects(rank_state)
        problem = None
        if self.is_main:
            try:
                pending.tmp.mkdir(parents=True)
                _write_durably(pending.tmp / TRAIN_STATE, json.dumps({**shared_state, "ranks": rank_states}))
                for name, text in texts.items():
                    _write_durably(pending.tmp / name, text)
            except OSError as e:
                problem = _os_error(e)
        problem = broadcast_object(problem)  # every rank stops, none waits for rank 0
        if problem is not None:
            self._abandon(pending, problem)
        try:
            if self.async_save:
                pending.future = _quiet_dcp(dcp.async_save, dcp_state, storage_writer=_Writer(pending.tmp),
                                            process_group=self._async_group)
            else:
                _quiet_dcp(dcp.save, dcp_state, storage_writer=_Writer(pending.tmp))
        except (OSError, CheckpointException) as e:  # DCP gathers every rank's failure: all ranks raise
            self._abandon_if_io(pending, e)
        self._pending = pending
        if not self.async_save:
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
        """Finish and commit the save in flight, if any: every rank hashes a share of the files,
        rank 0 writes the marker and renames the directory into place."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            if pending.future is not None:
                pending.future.result()
        except (OSError, CheckpointException) as e:  # the writer's collectives gave every rank the failure
            self._abandon_if_io(pending, e)
        barrier()  # every rank's shards are on disk
        names = broadcast_object(sorted(p.name for p in pending.tmp.iterdir() if p.is_file()) if self.is_main else None)
        rank, world = _rank_and_world()
        try:
            hashed: dict[str, FileRecord] | str = {
                n: FileRecord((pending.tmp / n).stat().st_size, file_digest(pending.tmp / n))
                for n in share(names, rank, world)}
        except OSError as e:  # every rank must reach the gather, and every rank must stop
            hashed = f"rank {rank}: {type(e).__name__}: {e}"
        parts = all_gather_objects(hashed)
        failed = [p for p in parts if isinstance(p, str)]
        if failed:
            self._abandon(pending, failed[0])
        problem = None
        if self.is_main:
            try:
                commit(pending.tmp, pending.final, {n: r for part in parts for n, r in part.items()})
            except OSError as e:
                problem = _os_error(e)
            else:
                log.info("checkpoint saved: %s", pending.final)
                try:
                    self._prune(pending.final)
                except OSError as e:  # housekeeping: the ranks waiting below must not wait for a rank that stopped
                    log.warning("could not prune old checkpoints under %s (%s: %s)", self.dir, type(e).__name__, e)
        problem = broadcast_object(problem)
        if problem is not None:
            self._abandon(pending, problem)
        self.committed = pending.final

    def _abandon_if_io(self, pending: _Pending, e: BaseException) -> NoReturn:
        cause = _os_error(e)
        if cause is None:
            raise e
        self._abandon(pending, cause)

    def _abandon(self, pending: _Pending, cause: str) -> NoReturn:
        """Remove a save that failed (a full disk would stay full with it) and stop every rank. Every
        rank gets here together (each failure is shared first), and leaves once it is removed."""
        if self.is_main:
            shutil.rmtree(pending.tmp, ignore_errors=True)
        barrier()
        try:
            free = f"{shutil.disk_usage(self.dir).free / 2**20:,.0f} MiB free there now"
        except OSError:
            free = "free space unknown"
        raise CheckpointSaveFailed(f"checkpoint {pending.final} could not be saved ({cause}); its partial files are "
                                   f"removed ({free}) and the earlier checkpoints are untouched")

    def _prune(self, committed: Path) -> None:
        """Keep the `keep` newest committed checkpoints up to the one just committed (marker and
        sizes: hashing them all at every save would cost more than the save). Resume has set damaged
        and other trajectories' directories aside (`set_aside`); a later step still here is not this
        run's state either: it neither counts nor goes until this run saves that step itself."""
        mine = [p for p in list_checkpoints(self.dir)
                if checkpoint_step(p) <= checkpoint_step(committed) and verify_share(p, checksums=False) is None]
        for old in mine[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path, dcp_state: dict[str, Any], splits: Sequence[Split] = ()
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Load DCP tensors in place into `dcp_state` ({"model": ..., "optim": ...}), converting
        what the checkpoint holds under old names (`splits`, see `load_dcp`); return (shared
        state, list of per-rank states). Collective. The checkpoint is verified again right before
        reading (DCP unpickles `.metadata` and the non-tensor optimizer state in the `.distcp`
        files), so nothing that changed since it was chosen is ever unpickled or trusted."""
        reason = verify_checkpoint(path)
        if reason is not None:
            raise CheckpointDamaged(f"{path}: {reason}; it changed after it was chosen for resume")
        entries = _read_metadata(path)
        check_weights_fit(path, entries, dcp_state["model"], splits,
                          f"resume with the model settings of {path / CONFIG_FILE}, or train this model in a new "
                          "run directory")
        load_dcp(path, dcp_state, splits, entries)
        return read_train_state(path)


def read_train_state(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A verified checkpoint's train_state.json: (shared state, list of per-rank states)."""
    try:
        state = json.loads((path / TRAIN_STATE).read_text())
        ranks = state.pop("ranks")
    except (ValueError, UnicodeDecodeError, KeyError, AttributeError) as e:  # sealed with its hash: another writer
        raise CheckpointDamaged(f"{path}: {TRAIN_STATE} is not a train state ({type(e).__name__}); this checkpoint "
                                "was not written by pretrain/main.py: resume from another one") from None
    return state, ranks


def commit(tmp: Path, final: Path, records: dict[str, FileRecord] | None = None) -> None:
    """Seal a fully written checkpoint directory: list its files with their hashes (`records`,
    computed here when not given) in the marker, then rename it into place, replacing a damaged
    directory of the same name (moved aside first, so a crash leaves one or the other)."""
    if records is None:
        records = {p.name: FileRecord(p.stat().st_size, file_digest(p)) for p in tmp.iterdir() if p.is_file()}
    write_marker(tmp, records)
    _fsync_path(tmp / MARKER)
    _fsync_path(tmp)
    _swap_into_place(tmp, final)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename a sealed directory to `final`, moving one already there aside first: a crash leaves
    the sealed `.tmp-` directory, which `finish_interrupted_commits` completes."""
    replaced = final.with_name(f".tmp-replaced-{final.name}-{os.getpid()}-{time.time_ns()}")
    if final.exists():
        os.rename(final, replaced)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def save_model_weights(tmp: Path, model_state: dict[str, Any]) -> None:
    """Write a weights-only checkpoint's tensors (single process); `commit` seals it."""
    _quiet_dcp(dcp.save, {"model": model_state}, checkpoint_id=str(tmp))


def load_model_weights(path: Path, model_state: dict[str, Any], splits: Sequence[Split] = (),
                       partial: bool = False) -> None:
    """Load only the model's tensors (in place) from a checkpoint, resharding as needed and
    converting old names (`splits`, see `load_dcp`).

    The checkpoint is verified first; names and global shapes are checked next, so a mismatch
    says which tensors differ instead of failing inside DCP. `partial`: the checkpoint may hold
    tensors this model has no place for (a deeper model's last blocks), which are left out."""
    reason = verify_checkpoint(path)
    if reason is not None:
        raise ValueError(f"{path}: not a complete, intact checkpoint ({reason}); pass another step_* directory "
                         "(an older one of the run)")
    entries = _read_metadata(path)
    check_weights_fit(path, entries, model_state, splits, f"build the model of {path / MODEL_CONFIG_FILE}", partial)
    load_dcp(path, {"model": model_state}, splits, entries)


class WeightsDoNotFit(ValueError):
    """A checkpoint's tensors are not this model's (another architecture or size)."""


def check_weights_fit(path: Path, entries: dict[str, Any], model_state: dict[str, Any], splits: Sequence[Split],
                      fix: str, partial: bool = False) -> None:
    """Every tensor of `model_state` (this rank's: a pipeline stage holds some) is in the checkpoint
    with its global shape, after converting old names, and (unless `partial`) every model tensor
    of the checkpoint is one of some rank's: else WeightsDoNotFit naming them and `fix`, instead
    of a failure inside DCP or weights dropped in silence. Collective when distributed: every rank
    gets the verdict."""
    saved = {k.removeprefix("model."): tuple(m.size) for k, m in entries.items()
             if k.startswith("model.") and hasattr(m, "size")}
    for s in _renamed(entries, {"model": model_state}, splits):  # the names and shapes after conversion
        saved.update((name, tuple(t.shape)) for name, t in s.parts(torch.empty(saved.pop(s.old), device="meta")))
    ours = {k: tuple(v.shape) for k, v in model_state.items()}
    problems = [f"{k} missing" for k in ours if k not in saved] + \
               [f"{k} is {saved[k]} in the checkpoint, {ours[k]} here" for k in ours if k in saved and saved[k] != ours[k]]
    gathered = all_gather_objects((problems, sorted(ours)))
    problems = list(dict.fromkeys(p for part, _ in gathered for p in part))  # ranks share tensors
    if not partial:
        anywhere = {k for _, names in gathered for k in names}
        problems += [f"{k} has no place here" for k in sorted(saved) if k not in anywhere]
    if problems:
        raise WeightsDoNotFit(f"{path}: weights do not fit this model ({len(problems)} tensors, e.g. "
                              f"{'; '.join(problems[:3])}); {fix}")


def _read_metadata(path: Path) -> dict[str, Any]:
    """The checkpoint's DCP entries (flattened key -> metadata); call after it verified."""
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _renamed(saved: dict[str, Any], dcp_state: dict[str, Any], splits: Sequence[Split]) -> list[Split]:
    """The splits to apply: the checkpoint holds the old name and the model here the new ones."""
    return [s for s in splits if f"model.{s.old}" in saved and f"model.{s.new[0][0]}" not in saved
            and s.new[0][0] in dcp_state["model"]]


def load_dcp(path: Path, dcp_state: dict[str, Any], splits: Sequence[Split] = (),
             metadata: dict[str, Any] | None = None) -> None:
    """`dcp.load` into `dcp_state` ({"model": {name: tensor}}, optionally "optim" as
    `get_state_dict` gives it), for any layout of this run (plain or DTensor-sharded tensors).

    A checkpoint saved before a layout change holds some parameters under an old name (`splits`:
    old name -> new names, rows stacked along dim 0). Those entries, and the optimizer's state of
    them (AdamW's moments split the same way, its step copied), are read into temporary full
    tensors, cut into the new tensors and copied into this rank's shards; the optimizer's param
    groups get the new names. `metadata`: the checkpoint's entries, when the caller read them.
    Collective, as `dcp.load`."""
    saved = metadata if metadata is not None else _read_metadata(path) if splits else {}
    todo = _renamed(saved, dcp_state, splits)
    if not todo:
        _quiet_dcp(dcp.load, dcp_state, checkpoint_id=str(path))
        return

    def temp(key: str) -> torch.Tensor:
        return torch.empty(saved[key].size, dtype=saved[key].properties.dtype)

    model, optim = dcp_state["model"], dcp_state.get("optim")
    news = {name for s in todo for name, _ in s.new}
    load: dict[str, Any] = {"model": {k: v for k, v in model.items() if k not in news}}
    load["model"].update({s.old: temp(f"model.{s.old}") for s in todo})
    if optim is not None:
        moments = {k: v for k, v in optim["state"].items() if k not in news}
        moments.update({s.old: {k: temp(f"optim.state.{s.old}.{k}") for k in optim["state"][s.new[0][0]]}
                        for s in todo})
        load["optim"] = {**optim, "state": moments}
    _quiet_dcp(dcp.load, load, checkpoint_id=str(path))
    for s in todo:
        for name, part in s.parts(load["model"][s.old]):
            copy_full_into(model[name], part)
    if optim is None:
        return
    renamed = {s.old: [name for name, _ in s.new] for s in todo}
    for s in todo:
        for k, t in load["optim"]["state"][s.old].items():
            parts = s.parts(t) if t.dim() else [(name, t) for name in renamed[s.old]]  # a scalar (step): to each
            for name, part in parts:
                copy_full_into(optim["state"][name][k], part)
    for group in optim["param_groups"]:  # the saved groups (which DCP loaded in place) list the old names
        group["params"] = [new for name in group["params"] for new in renamed.get(name, [name])]


def _write_durably(path: Path, text: str) -> None:
    path.write_text(text)
    _fsync_path(path)


def _fsync_path(path: Path) -> None:
    """Make a file's bytes, or a directory's renames and new entries, durable (no-op where the
    filesystem refuses)."""
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
