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
import dataclasses
import sys
from pathlib import Path
from typing import Any, NoReturn

from data_pipeline.files import write_atomic
from launch.k8s import K8sOptions, render_k8s
from launch.slurm import REQUEUE_MARGIN_S, SlurmOptions, render_slurm
from launch.spec import DEFAULT_GRACE_S, LaunchSpec
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


def defaults(options: type) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(options)}


SLURM, K8S = defaults(SlurmOptions), defaults(K8sOptions)


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
    p.add_argument("--grace-s", type=count, default=DEFAULT_GRACE_S,
                   help="seconds the trainers get to checkpoint after a preemption signal")
    # One scheduler's options (default None: given for the other target, they are refused, not ignored).
    p.add_argument("--partition", help="slurm partition(s) (default: none, the cluster's default)")
    p.add_argument("--time", help=f"slurm time limit per allocation (default {SLURM['time']})")
    p.add_argument("--signal-lead-s", type=int_in_range(0, 65535),  # sbatch --signal's range
                   help=f"slurm: USR1 this long before the limit; at least --grace-s + {REQUEUE_MARGIN_S} "
                        f"(default {SLURM['signal_lead_s']})")
    p.add_argument("--image", help=f"k8s container image (default {K8S['image']})")
    p.add_argument("--namespace", help=f"k8s namespace (default {K8S['namespace']})")
    p.add_argument("--pvc", help="k8s ReadWriteMany claim holding data and run directory "
                                 f"(default {K8S['pvc']})")
    p.add_argument("--run-mount", help=f"k8s mount path of the claim (default {K8S['run_mount']})")
    p.add_argument("--backoff-limit", type=at_least_0,
                   help="k8s: failures of the run tolerated, not preemptions; the Job's backoffLimit is this x --nodes, "
                        f"since one crash fails every pod (default {K8S['backoff_limit']})")
    p.add_argument("--shm-gib", type=count,
                   help=f"k8s: size of the /dev/shm memory volume (default {K8S['shm_gib']})")
    p.add_argument("--out", help="write here instead of stdout")
    return p


def scheduler_options(args: argparse.Namespace) -> SlurmOptions | K8sOptions:
    """The chosen scheduler's options, defaults filled in; an option of the other one is refused
    (a --time given to a k8s render would otherwise be silently dropped)."""
    own, other = (SLURM, K8S) if args.target == "slurm" else (K8S, SLURM)
    stray = [name for name in other if getattr(args, name) is not None]
    if stray:
        flag = "--" + stray[0].replace("_", "-")
        raise LaunchError(f"{flag} is not a {args.target} option (it is for "
                          f"{'k8s' if args.target == 'slurm' else 'slurm'}); drop it")
    values = {name: default if getattr(args, name) is None else getattr(args, name) for name, default in own.items()}
    return SlurmOptions(**values) if args.target == "slurm" else K8sOptions(**values)


def spec_from_args(args: argparse.Namespace, train_args: list[str]) -> LaunchSpec:
    nproc = args.procs_per_node or args.gpus_per_node
    if not nproc:
        raise LaunchError("--gpus-per-node 0 (CPU nodes): give --procs-per-node, the number of trainers per node")
    return LaunchSpec(job_name=args.job_name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      nproc_per_node=nproc, cpus_per_rank=args.cpus_per_rank, run_dir=args.run_dir,
                      python=args.python, master_port=args.master_port, omp_threads=args.omp_threads,
                      grace_s=args.grace_s, train_args=tuple(train_args), workdir=args.workdir)


def render(args: argparse.Namespace, train_args: list[str]) -> str:
    spec, options = spec_from_args(args, train_args), scheduler_options(args)
    return render_slurm(spec, options) if isinstance(options, SlurmOptions) else render_k8s(spec, options)


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
