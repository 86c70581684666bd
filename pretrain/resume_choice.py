"""Which checkpoint a run resumes from, and what that choice leaves stale (damaged checkpoints
passed over, a rewound run's later steps), set aside once the resume has loaded."""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from parallel.distributed import barrier, broadcast_object
from pretrain.checkpoint import (NoIntactCheckpoint, checkpoint_origin, checkpoint_step, find_latest_complete,
                                 finish_interrupted_commits, list_checkpoints, origin_key, set_aside,
                                 verify_checkpoint)
from pretrain.checkpoint_integrity import is_damage
from pretrain.config import ConfigError
from pretrain.rank_agreement import rank0_decides

log = logging.getLogger("pretrain")


def choose_resume_checkpoint(ckpt_dir: Path, resume_from: str,
                             stale: dict[str, list[Path]] | None = None) -> Path | None:
    """The checkpoint to resume from (None: start fresh): without `resume_from` the newest that
    verifies; with it that one, unless the run directory holds a newer checkpoint of the trajectory
    it started (a requeued job repeating its command continues, not restarts). `stale` receives, on
    rank 0, what the choice makes stale, for `set_aside_stale` once the resume has loaded: "damaged"
    (passed over for their own damage, not for a failed read) and "superseded" (when `resume_from` is
    taken, every checkpoint not on its path: the run directory's later steps, another trajectory's; all
    of them when it lies elsewhere). Collective: every rank verifies a share of the files and all get
    one answer (ranks resuming from different steps would train on silently)."""
    resume_from = broadcast_object(resume_from)  # rank 0's word, should the ranks' configs differ
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        finish_interrupted_commits(ckpt_dir)  # the others wait in find_latest_complete's broadcast
    passed_over: list[tuple[Path, str]] = []
    try:
        newest = find_latest_complete(ckpt_dir, passed_over)
    except NoIntactCheckpoint as e:
        if not resume_from:
            raise ConfigError(f"checkpoint: {e}") from None
        newest = None
    chosen = newest
    if resume_from:
        requested = Path(resume_from)
        origin = rank0_decides(lambda: checkpoint_origin(newest) if newest else None, main)
        if origin == origin_key(requested):
            log.warning("continuing from %s, the newest checkpoint of the run resumed from %s (a requeued command); to "
                        "rewind to %s again, move the newer checkpoints out of %s first", newest, requested,
                        requested, ckpt_dir)
        elif newest is None or origin_key(newest) != origin_key(requested):  # the newest was verified above
            reason = verify_checkpoint(requested)
            if reason is not None:
                if not requested.is_dir():
                    reason = "no such directory"
                elif (requested / "checkpoints").is_dir() or list_checkpoints(requested):
                    reason = "a run or checkpoints directory, not one checkpoint"
                raise ConfigError(f"config: checkpoint.resume_from={resume_from} does not verify ({reason}); point "
                                  "it at an intact step_* directory")
            chosen = requested
    if main and stale is not None:
        stale["damaged"] = [p for p, reason in passed_over if is_damage(reason)]
        if chosen is not None and chosen != newest:
            target = chosen.resolve()
            step = checkpoint_step(target) if target.parent == ckpt_dir.resolve() else None
            stale["superseded"] = [p for p in list_checkpoints(ckpt_dir) if p not in stale["damaged"]
                                   and p.resolve() != target and (step is None or checkpoint_step(p) > step)]
    return chosen


def set_aside_stale(ckpt_dir: Path, stale: dict[str, list[Path]], is_main: bool) -> None:
    """Move what `choose_resume_checkpoint` found stale out of the listing (rank 0; collective)."""
    if is_main:
        for why, paths in stale.items():
            set_aside(paths, ckpt_dir, why)
    barrier()
