"""The Slurm batch script: `#SBATCH` lines from validated values, the values as quoted shell
assignments, then the static script body (launch/scripts/), so no value is ever shell code."""
from __future__ import annotations

import shlex
from dataclasses import dataclass

from launch.spec import DEFAULT_GRACE_S, LaunchSpec, node_script
from launch.validate import (NO_CONTROL, SLURM_JOB_NAME, SLURM_PARTITION, SLURM_RUN_DIR, SLURM_TIME, LaunchError,
                             slurm_time_seconds)


REQUEUE_MARGIN_S = 30  # after torchrun's wait of --grace-s, time for the script to requeue the job


@dataclass(frozen=True)
class SlurmOptions:
    partition: str = ""
    time: str = "24:00:00"
    signal_lead_s: int = DEFAULT_GRACE_S + 2 * REQUEUE_MARGIN_S


def _check(spec: LaunchSpec, opts: SlurmOptions) -> None:
    SLURM_JOB_NAME.check("--job-name", spec.job_name)
    SLURM_RUN_DIR.check("--run-dir", spec.run_dir)
    if spec.workdir is not None:
        NO_CONTROL.check("--workdir", spec.workdir)
    if opts.partition:
        SLURM_PARTITION.check("--partition", opts.partition)
    SLURM_TIME.check("--time", opts.time)
    if opts.signal_lead_s >= slurm_time_seconds(opts.time):
        raise LaunchError(f"--signal-lead-s {opts.signal_lead_s}: the USR1 must come before the time limit "
                          f"--time {opts.time}; lower one or raise the other")
    if opts.signal_lead_s < spec.grace_s + REQUEUE_MARGIN_S and slurm_time_seconds(opts.time) < float("inf"):
        # At the limit Slurm kills the job after its KillWait (30 s by default), whatever torchrun waits.
        raise LaunchError(f"--signal-lead-s {opts.signal_lead_s} with --grace-s {spec.grace_s}: the checkpoint saved "
                          f"after USR1 must be done before the time limit, with {REQUEUE_MARGIN_S} s left to "
                          f"requeue; raise --signal-lead-s to {spec.grace_s + REQUEUE_MARGIN_S} or lower --grace-s")


def render_slurm(spec: LaunchSpec, opts: SlurmOptions) -> str:
    _check(spec, opts)
    sbatch = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
              f"--cpus-per-task={spec.cpus_per_rank * spec.nproc_per_node}"]
    sbatch += [f"--gpus-per-node={spec.gpus_per_node}"] if spec.gpus_per_node else []
    sbatch += [f"--partition={opts.partition}"] if opts.partition else []
    sbatch += [f"--time={opts.time}", "--requeue", "--open-mode=append", f'--output="{spec.run_dir}/slurm-%j.out"',
               f"--signal=USR1@{opts.signal_lead_s}"]
    values = [f"export {name}={shlex.quote(value)}" for name, value in spec.environment().items()]
    values += [f"WORKDIR={shlex.quote(spec.workdir or '.')}",
               "TRAIN_ARGS=(" + " ".join(shlex.quote(a) for a in spec.train_args) + ")"]
    return "\n".join([
        "#!/bin/bash",
        "# Rendered by `python -m launch.render slurm`: render it again rather than edit it.",
        "# The run directory must exist before sbatch (it holds the job's output file).",
        *(f"#SBATCH {line}" for line in sbatch),
        "# USR1 reaches torchrun and the trainers --signal-lead-s seconds before the time limit;",
        "# they save a checkpoint and exit 75, and this script requeues the job.",
        "",
        "# The renderer's values, each a single shell word.",
        *values,
        "",
        node_script("preemption.sh", "slurm_job.sh"),
    ])
