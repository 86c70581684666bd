r"""Render a Slurm batch script or a Kubernetes manifest for a multi-node training run.

    python -m launch.render slurm --nodes 16 --partition gpu --run-dir /shared/runs/r1 --out job.sbatch \
        -- --config configs/hybrid_moe_1b.toml --data /shared/dclm
    python -m launch.render k8s --nodes 2 --image REGISTRY/hybrid-pretrain:TAG --run-dir /runs/r1 \
        -- --config configs/hybrid_moe_1b.toml --data /runs/data/dclm | kubectl apply -f -

Both start one torchrun per node (c10d rendezvous), requeue a preempted run (the trainers exit
75 after checkpointing) and auto-resume from the newest complete checkpoint in the run directory,
on any number of nodes. Every value is checked against what the scheduler accepts.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from data_pipeline.files import write_atomic
from launch.k8s import K8sOptions, render_k8s
from launch.slurm import SlurmOptions, render_slurm
from launch.spec import LaunchSpec
from launch.validate import LaunchError, int_in_range

PROG = "python -m launch.render"


class _OneLineParser(argparse.ArgumentParser):
    """Errors in one line (argparse prints the usage first)."""

    def error(self, message: str) -> NoReturn:
        usage_error(f"{self.prog}: {message}")


def usage_error(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as every command of the project does for bad input."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="Arguments after -- are passed to pretrain/main.py.")
    count, at_least_0 = int_in_range(1), int_in_range(0)
    p.add_argument("target", choices=("slurm", "k8s"))
    p.add_argument("--nodes", type=count, required=True)
    p.add_argument("--gpus-per-node", type=at_least_0, default=8, help="0: CPU nodes (give --procs-per-node)")
    p.add_argument("--procs-per-node", type=count, help="trainers per node (default: one per GPU)")
    p.add_argument("--cpus-per-rank", type=count, default=12, help="CPUs requested per trainer")
    p.add_argument("--job-name", default="pretrain")
    p.add_argument("--run-dir", required=True, help="shared directory every node can write")
    p.add_argument("--workdir", help="repository root on the nodes (slurm default: the submit directory) / "
                                     "in the image (k8s default: the image's WORKDIR)")
    p.add_argument("--python", default="python", help="the interpreter with the project installed")
    p.add_argument("--master-port", type=int_in_range(1, 65535), default=29500, help="c10d rendezvous port")
    p.add_argument("--omp-threads", type=count, default=8)
    p.add_argument("--grace-s", type=count, default=300,
                   help="seconds the trainers get to checkpoint after a preemption signal")
    p.add_argument("--partition", default="", help="slurm partition(s) (omitted when empty)")
    p.add_argument("--time", default="24:00:00", help="slurm time limit per allocation")
    p.add_argument("--signal-lead-s", type=int_in_range(0, 65535), default=300,  # sbatch --signal's range
                   help="slurm: USR1 this long before the limit")
    p.add_argument("--image", default="hybrid-pretrain:latest", help="k8s container image")
    p.add_argument("--namespace", default="default")
    p.add_argument("--pvc", default="runs", help="k8s ReadWriteMany claim holding data and run directory")
    p.add_argument("--run-mount", default="/runs", help="k8s mount path of the claim")
    p.add_argument("--backoff-limit", type=at_least_0, default=3, help="k8s: failures tolerated (not preemptions)")
    p.add_argument("--shm-gib", type=count, default=64, help="k8s: size of the /dev/shm memory volume")
    p.add_argument("--out", help="write here instead of stdout")
    return p


def spec_from_args(args: argparse.Namespace, train_args: list[str]) -> LaunchSpec:
    nproc = args.procs_per_node or args.gpus_per_node
    if not nproc:
        raise LaunchError("--gpus-per-node 0 (CPU nodes): give --procs-per-node, the number of trainers per node")
    return LaunchSpec(job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      nproc_per_node=nproc, cpus_per_rank=args.cpus_per_rank, run_dir=args.run_dir,
                      python=args.python, master_port=args.master_port, omp_threads=args.omp_threads,
                      grace_s=args.grace_s, train_args=tuple(train_args), workdir=args.workdir)


def slurm_options(args: argparse.Namespace) -> SlurmOptions:
    return SlurmOptions(partition=args.partition, time=args.time, signal_lead_s=args.signal_lead_s)


def k8s_options(args: argparse.Namespace) -> K8sOptions:
    return K8sOptions(image=args.image, namespace=args.namespace, pvc=args.pvc, run_mount=args.run_mount,
                      backoff_limit=args.backoff_limit, shm_gib=args.shm_gib)


def render(args: argparse.Namespace, train_args: list[str]) -> str:
    spec = spec_from_args(args, train_args)
    if args.target == "slurm":
        return render_slurm(spec, slurm_options(args))
    return render_k8s(spec, k8s_options(args))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The renderer's options, and the trainer's arguments (those after --)."""
    split = argv.index("--") if "--" in argv else len(argv)
    return build_parser().parse_args(argv[:split]), argv[split + 1:]


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse(list(sys.argv[1:] if argv is None else argv))
    try:
        text = render(args, train_args)
    except LaunchError as e:
        usage_error(f"{PROG}: {e}")
    if args.out:
        try:  # whole or not at all: a half-written job script must never be submitted
            write_atomic(Path(args.out), text)
        except OSError as e:
            usage_error(f"{PROG}: --out {args.out}: cannot write it ({e.strerror or e}); pass a writable file path")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
