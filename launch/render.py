"""Render a Slurm batch script or a Kubernetes manifest for a multi-node training run.

    python -m launch.render slurm --nodes 16 --run-dir /shared/runs/r1 -- --arch hybrid_moe --size 1b --data /shared/data/dclm
    python -m launch.render k8s --nodes 2 --image REGISTRY/hybrid-pretrain:latest --run-dir /runs/r1 -- --config configs/hybrid_moe_1b.toml

Both requeue a preempted run (the trainer exits 75 after checkpointing) and auto-resume from
the newest complete checkpoint in the run directory.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path, PurePosixPath
from string import Template

REQUEUE_EXIT_CODE = 75  # pretrain.trainer.EXIT_PREEMPTED; launch/ does not import pretrain/
TEMPLATES = Path(__file__).parent / "templates"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.render", description=__doc__.split("\n\n")[0])
    p.add_argument("target", choices=("slurm", "k8s"))
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--job-name", default="pretrain")
    p.add_argument("--run-dir", required=True, help="shared directory every node can write")
    p.add_argument("--workdir", default=".", help="repository root on the nodes / in the image")
    p.add_argument("--python", default="python", help="slurm: the interpreter with the project installed")
    p.add_argument("--partition", default="", help="slurm partition (omitted when empty)")
    p.add_argument("--time", default="24:00:00", help="slurm time limit per allocation")
    p.add_argument("--cpus-per-task", type=int, default=12)
    p.add_argument("--signal-lead-s", type=int, default=300, help="slurm: USR1 this long before the limit")
    p.add_argument("--image", default="hybrid-pretrain:latest", help="k8s container image")
    p.add_argument("--namespace", default="default")
    p.add_argument("--pvc", default="runs", help="k8s ReadWriteMany claim holding the run directory")
    p.add_argument("--run-mount", default="/runs", help="k8s mount path of the claim")
    p.add_argument("--backoff-limit", type=int, default=3)
    p.add_argument("--grace-s", type=int, default=300, help="k8s terminationGracePeriodSeconds")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--omp-threads", type=int, default=8)
    p.add_argument("--out", help="write here instead of stdout")
    p.epilog = "Arguments after -- are passed to pretrain/main.py."
    return p


def render(args: argparse.Namespace, train_args: list[str]) -> str:
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("launch.render: --nodes and --gpus-per-node must be >= 1")
    if any(a == "--run-dir" or a.startswith("--run-dir=") for a in train_args):
        raise SystemExit("launch.render: give --run-dir to the renderer, not after --; it is used by both")
    if args.target == "k8s" and not PurePosixPath(args.run_dir).is_relative_to(args.run_mount):
        raise SystemExit(f"launch.render: --run-dir {args.run_dir} must lie under --run-mount {args.run_mount} "
                         "(the shared volume); fix one of them")
    values = {k: v for k, v in vars(args).items()}
    values.update(
        train_args=" ".join(shlex.quote(a) for a in train_args),
        run_dir=shlex.quote(args.run_dir),
        partition_line=f"#SBATCH --partition={args.partition}\n" if args.partition else "",
        requeue_code=REQUEUE_EXIT_CODE,
    )
    name = "slurm.sbatch" if args.target == "slurm" else "k8s.yaml"
    return Template((TEMPLATES / name).read_text()).substitute(values)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:split])
    text = render(args, argv[split + 1:])
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
