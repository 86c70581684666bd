"""Entry point: `python pretrain/main.py ...` or `torchrun --nproc-per-node N pretrain/main.py ...`.

Exit codes: 0 finished, 2 bad configuration, 3 stopped by a guard, 75 preempted (checkpoint
saved; requeue), 1 anything else (the failing rank logs why).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before the seconds of importing torch: a preemption signal from the first instant is
    # recorded (and acted on once the run directory is known), never a silent exit 143.
    from pretrain.preemption import PREEMPTION

    PREEMPTION.install()

import logging
from pathlib import Path

import torch

from parallel.distributed import DistInfo, destroy_distributed, init_distributed
from parallel.float8 import float8_unavailable
from parallel.mesh import ParallelDims
from pretrain.checkpoint import CheckpointSaveFailed
from pretrain.config import ConfigError, JobConfig, parse_args, to_toml, unused_settings
from pretrain.model.config import ModelConfig
from pretrain.metrics import setup_logging
from pretrain.preemption import PREEMPTION, Preempted, PreemptedAtStartUp
from pretrain.summary import read_summary, write_summary
from pretrain.layout import activation_bytes, layout_report, loss_rows, loss_working_set_bytes
from pretrain.job import build_model_from_config, grad_accum_steps, parallel_dims, resolve_num_streams
from pretrain.rank_agreement import agreed_config_errors
from pretrain.trainer import EXIT_PREEMPTED, EXIT_STOPPED, Trainer, TrainingStopped

log = logging.getLogger("pretrain")
EXIT_CONFIG = 2


def estimate_memory_gib(n_params: int, cfg: JobConfig, mcfg: ModelConfig, dims: ParallelDims) -> dict[str, float]:
    """Rough per-GPU memory: fp32 params+grads+AdamW moments split over pp x dp_shard x cp x tp (an
    upper bound on the split: replicated tensors are not split by tp; `--world-size` reports the
    exact shards), plus the activations of one micro-batch under bf16 autocast
    (`activation_bytes`, all blocks), split over tp x cp, and the loss's working set."""
    states = 16 * n_params / (dims.pp * dims.dp_shard * dims.cp * dims.tp)
    activations = activation_bytes(mcfg.blocks, cfg, mcfg.d_model, dims)
    loss = loss_working_set_bytes(mcfg.vocab_size // dims.tp, mcfg.d_model, loss_rows(cfg, dims))
    return {"states_gib": states / 2**30, "activations_gib": activations / 2**30, "loss_gib": loss / 2**30,
            "total_gib": (states + activations + loss) / 2**30}


def dry_run(cfg: JobConfig, world_size: int | None = None, ranks: list[int] | None = None) -> int:
    """Build on the meta device (no memory, no data read beyond manifests) and report sizes; with
    more than one rank (`world_size`, else WORLD_SIZE), also the layout on them (pretrain.layout)."""
    from pretrain.accounting import count_params, flops_per_token

    if world_size is not None and world_size < 1:
        raise ConfigError(f"command line: --world-size {world_size} is not a rank count; pass N >= 1")
    model = build_model_from_config(cfg, device="meta")
    mcfg = model.config
    counts = count_params(mcfg)
    # Estimate for the launch this would be: --world-size, torchrun's WORLD_SIZE, else the parallel sizes given.
    p = cfg.parallel
    env_world = os.environ.get("WORLD_SIZE", str(p.pp * p.dp_replicate * max(p.dp_shard, 1) * p.cp * p.tp))
    if world_size is None and not (env_world.isdigit() and int(env_world) >= 1):
        raise ConfigError(f"environment: WORLD_SIZE={env_world!r} is not a rank count >= 1; unset it or fix it")
    world = world_size or int(env_world)
    dims = parallel_dims(cfg, world)
    n_params = counts["total"]
    mem = estimate_memory_gib(n_params, cfg, mcfg, dims)
    print(to_toml(cfg))
    for unused in unused_settings(cfg, mcfg.blocks):
        print(f"warning: {unused}", file=sys.stderr)
    print(f"pattern              {mcfg.pattern}")
    print(f"parameters           {n_params:,} (non-embedding {counts['non_embedding']:,}, "
          f"embedding {counts['embedding']:,}, active non-embedding {counts['active_non_embedding']:,})")
    flops = flops_per_token(mcfg, cfg.data.seq_len, counts)
    print(f"FLOPs per token      {flops['total']:.4g} training fwd+bwd at seq_len {cfg.data.seq_len} "
          f"({flops['non_embedding']:.4g} without the LM head)")
    print(f"memory per GPU       ~{mem['total_gib']:.1f} GiB (states {mem['states_gib']:.1f} + activations "
          f"{mem['activations_gib']:.1f} + loss {mem['loss_gib']:.1f}) at world size {world}, "
          f"dp_shard {dims.dp_shard}, cp {dims.cp}, tp {dims.tp}")
    dp = dims.dp
    accum = grad_accum_steps(cfg, dp)
    print(f"batch                {accum * dp * cfg.train.micro_batch_size * cfg.data.seq_len:,} tokens per step "
          f"({dp} data-parallel ranks x micro-batch {cfg.train.micro_batch_size} x {accum} accumulation steps)")
    streams = resolve_num_streams(cfg.data.num_streams, dp)
    print(f"data streams         {streams} (a resumed run keeps its checkpoint's count)")
    bad = [r for r in ranks or [] if not 0 <= r < world]
    if bad:
        raise ConfigError(f"command line: --rank {bad[0]} is not a rank of world size {world}; use 0..{world - 1}")
    # the GPU itself is the dry run's assumption, unless the run is on the CPU
    fp8_problem = float8_unavailable(cfg.train.fp8, torch.device("cpu") if cfg.train.device == "cpu" else None)
    if fp8_problem:
        raise ConfigError(f"config: {fp8_problem}")
    if world > 1:  # the layout of a multi-rank launch: --world-size, or torchrun's / a WORLD_SIZE= prefix
        # by default the first and last rank, and the first of each pipeline stage (stages hold other blocks)
        default = sorted({0, world - 1, *(stage * world // dims.pp for stage in range(dims.pp))})
        with agreed_config_errors():  # one process: turns a dimension the layout cannot split into one line
            print(layout_report(cfg, world, ranks or default, accum))
    return 0


def launch_rank() -> int:
    """This process's rank as the launcher set it (torchrun's RANK, a bare srun's SLURM_PROCID),
    known before any process group exists."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def write_early_summary(run_dir: str | None, status: str, code: int, error: str, cfg: JobConfig | None = None) -> None:
    """summary.json (rank 0) for a run that ends before the trainer could write one: a signal
    during start-up ("preempted", 75: the launcher requeues it, as after a preemption mid-run) or a
    bad configuration ("config_error", 2: the launcher must not retry it; torchrun itself reports
    every failure as 1). A config error is recorded only for the launchers that read it
    (LAUNCH_READS_SUMMARY=1: launch/spec.py) and never over a finished run's summary: a typo at a
    prompt must not cost a run its record. Failing to write is logged, never raised over the error."""
    if launch_rank() != 0 or run_dir is None:
        return
    if status == "config_error" and (os.environ.get("LAUNCH_READS_SUMMARY") != "1" or _finished(Path(run_dir))):
        return
    run = {"total_steps": cfg.train.steps, "arch": cfg.model.arch, "size": cfg.model.size} if cfg else {}
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        write_summary(Path(run_dir), {"status": status, "exit_code": code, "error": error, "step": None,
                                      "checkpoint": None, "run_dir": run_dir, **run})
    except OSError as e:
        log.error("could not write %s/summary.json (%s: %s)", run_dir, type(e).__name__, e)


def _finished(run_dir: Path) -> bool:
    try:
        return read_summary(run_dir).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def given_run_dir(argv: list[str]) -> str | None:
    """--run-dir from a command line that did not parse (the launchers always pass it)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--run-dir="):
            return arg.partition("=")[2]
        if arg == "--run-dir" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def exit_code(e: BaseException, cfg: JobConfig, info: DistInfo | None) -> int:
    """The documented exit code of a run that ended with `e`, after saying why."""
    if isinstance(e, PreemptedAtStartUp):
        log.warning("preempted (%s) before the first step; exit code %d asks the launcher to requeue",
                    e, EXIT_PREEMPTED)
        write_early_summary(cfg.run_dir, "preempted", EXIT_PREEMPTED, str(e), cfg)
        return EXIT_PREEMPTED
    if isinstance(e, Preempted):  # mid-run: the trainer saved a checkpoint and wrote summary.json
        return EXIT_PREEMPTED
    if isinstance(e, TrainingStopped):
        return EXIT_STOPPED
    if isinstance(e, ConfigError):
        log.error("%s", e)
        write_early_summary(cfg.run_dir, "config_error", EXIT_CONFIG, str(e), cfg)
        return EXIT_CONFIG
    if isinstance(e, CheckpointSaveFailed):  # its message says it all: no traceback
        log.error("%s", e)
        return 1
    rank, world = (info.rank, info.world_size) if info else (launch_rank(), 0)
    log.error("rank %d of %d failed: %s: %s", rank, world, type(e).__name__, e, exc_info=e)
    return 1


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        for flag, value in (("--world-size", args.world_size), ("--rank", args.rank)):
            if value is not None and not args.dry_run:
                raise ConfigError(f"command line: {flag} only goes with --dry-run; add --dry-run")
        if args.dry_run:
            return dry_run(cfg, args.world_size, args.rank)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        given = sys.argv[1:] if argv is None else argv
        if "--dry-run" not in given:
            write_early_summary(given_run_dir(given), "config_error", EXIT_CONFIG, str(e))
        return EXIT_CONFIG
    info = None
    try:
        PREEMPTION.start_up(
            on_stuck=lambda reason: write_early_summary(cfg.run_dir, "preempted", EXIT_PREEMPTED, reason, cfg))
        device_type = None if cfg.train.device == "auto" else cfg.train.device
        if device_type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("config: train.device = 'cuda' but no CUDA device is available here; set "
                              "train.device=cpu (or auto), or run on a GPU machine")
        info = init_distributed(device_type)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        setup_logging(Path(cfg.run_dir), info.rank)
        Trainer(cfg, info, PREEMPTION).train()
        return 0
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - every ending gets its documented exit code
        PREEMPTION.training()  # from here a signal is only recorded: it must not break the exit path
        return exit_code(e, cfg, info)
    finally:
        PREEMPTION.training()
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
