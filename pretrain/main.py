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

from parallel.distributed import destroy_distributed, init_distributed
from parallel.mesh import ParallelDims
from pretrain.config import ConfigError, JobConfig, parse_args, to_toml
from pretrain.metrics import setup_logging
from pretrain.preemption import PREEMPTION, Preempted, PreemptedAtStartUp
from pretrain.summary import write_summary
from pretrain.trainer import (EXIT_PREEMPTED, EXIT_STOPPED, Trainer, TrainingStopped, build_model_from_config,
                              grad_accum_steps, resolve_num_streams)

log = logging.getLogger("pretrain")
EXIT_CONFIG = 2


def estimate_memory_gib(n_params: int, cfg: JobConfig, n_layers: int, d_model: int, dp_shard: int) -> dict[str, float]:
    """Rough per-GPU memory: fp32 params+grads+AdamW moments sharded over dp_shard, plus the
    activations of one micro-batch under bf16 autocast, calibrated on the H200 peaks of the 1B
    presets (docs/benchmarks.md): ~90 bytes per token per d_model per block without activation
    checkpointing (llama measured 69, the Mamba2 and MoE hybrids 90); with it, the fp32 block
    inputs (4 bytes) plus one block being recomputed (~60; 1B hybrid_moe measured 107 in all)."""
    states = 16 * n_params / dp_shard
    per_token = 4 * n_layers + 60 if cfg.train.activation_checkpointing else 90 * n_layers
    activations = per_token * cfg.train.micro_batch_size * cfg.data.seq_len * d_model
    return {"states_gib": states / 2**30, "activations_gib": activations / 2**30,
            "total_gib": (states + activations) / 2**30}


def dry_run(cfg: JobConfig) -> int:
    """Build on the meta device (no memory, no data read beyond manifests) and report sizes."""
    from pretrain.accounting import count_params, flops_per_token

    model = build_model_from_config(cfg, device="meta")
    mcfg = model.config
    counts = count_params(mcfg)
    # Estimate for the launch this would be: torchrun's WORLD_SIZE, else the parallel sizes given.
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", p.dp_replicate * p.dp_shard if p.dp_shard > 0 else 1))
    dims = ParallelDims(dp_replicate=cfg.parallel.dp_replicate, dp_shard=cfg.parallel.dp_shard).resolve(world)
    n_params = counts["total"]
    mem = estimate_memory_gib(n_params, cfg, len(model.blocks), mcfg.d_model, dims.dp_shard)
    print(to_toml(cfg))
    print(f"pattern              {mcfg.pattern}")
    print(f"parameters           {n_params:,} (non-embedding {counts['non_embedding']:,}, "
          f"embedding {counts['embedding']:,}, active non-embedding {counts['active_non_embedding']:,})")
    flops = flops_per_token(mcfg, cfg.data.seq_len, counts)
    print(f"FLOPs per token      {flops['total']:.4g} training fwd+bwd at seq_len {cfg.data.seq_len} "
          f"({flops['non_embedding']:.4g} without the LM head)")
    print(f"memory per GPU       ~{mem['total_gib']:.1f} GiB (states {mem['states_gib']:.1f} + activations "
          f"{mem['activations_gib']:.1f}) at world size {world}, dp_shard {dims.dp_shard}")
    dp = dims.dp
    accum = grad_accum_steps(cfg, dp)
    print(f"batch                {accum * dp * cfg.train.micro_batch_size * cfg.data.seq_len:,} tokens per step "
          f"({dp} data-parallel ranks x micro-batch {cfg.train.micro_batch_size} x {accum} accumulation steps)")
    streams = resolve_num_streams(cfg.data.num_streams, dp)
    print(f"data streams         {streams} (a resumed run keeps its checkpoint's count)")
    return 0


def write_startup_preempted_summary(cfg: JobConfig, error: str) -> None:
    """summary.json for a signal before the first step (rank 0; nothing new was saved), so the
    launcher requeues the job as it would after a preemption mid-run."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    write_summary(Path(cfg.run_dir), {
        "status": "preempted", "exit_code": EXIT_PREEMPTED, "error": error, "step": None,
        "total_steps": cfg.train.steps, "checkpoint": None, "arch": cfg.model.arch, "size": cfg.model.size,
        "run_dir": cfg.run_dir})


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, args = parse_args(argv)
        if args.dry_run:
            return dry_run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    info = None
    try:
        PREEMPTION.start_up()
        device_type = None if cfg.train.device == "auto" else cfg.train.device
        info = init_distributed(device_type)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        setup_logging(Path(cfg.run_dir), info.rank)
        Trainer(cfg, info, PREEMPTION).train()
        return 0
    except PreemptedAtStartUp as e:
        PREEMPTION.training()  # a second signal must not interrupt writing the summary
        log.warning("preempted (%s) before the first step; exit code %d asks the launcher to requeue",
                    e, EXIT_PREEMPTED)
        write_startup_preempted_summary(cfg, str(e))
        return EXIT_PREEMPTED
    except Preempted:  # mid-run: the trainer saved a checkpoint and wrote summary.json
        return EXIT_PREEMPTED
    except TrainingStopped:
        return EXIT_STOPPED
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_CONFIG
    except Exception as e:  # noqa: BLE001 - report which rank failed and why, then exit non-zero
        rank, world = (info.rank, info.world_size) if info else (int(os.environ.get("RANK", "0")), 0)
        log.exception("rank %d of %d failed: %s: %s", rank, world, type(e).__name__, e)
        return 1
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
