"""Compute-optimal scaling sweeps.

    python -m pretrain.scaling plan --archs llama mamba2 --sizes 100m 350m 1b 3b \
        --budgets 2e19 4e19 8e19 2e20 4e20 --data data/dclm --out sweeps/s1 [--throughput RUN_DIR]
    python -m pretrain.scaling run sweeps/s1                           # locally, point after point
    python -m pretrain.scaling run sweeps/s1 --render slurm -- --nodes 1 --partition gpu
    python -m pretrain.scaling fit sweeps/s1

`run` exits 0 when every point has finished, 75 when one was preempted (SIGTERM/SIGUSR1; run it
again to resume), 130 when interrupted (Ctrl-C), 1 when one failed. Bad input is one line on stderr and
exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

PROG = "python -m pretrain.scaling"
EXIT_USAGE = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    from pretrain.scaling.plan import GridSpec
    from pretrain.scaling.rules import PAPER_BATCH_TOKENS

    d = GridSpec([], [], [], "")
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("plan", help="grid -> trainer configs, plan.json; prints the grid and its cost",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("--archs", nargs="+", required=True, help="e.g. llama mamba2 inter_hybrid")
    pl.add_argument("--sizes", nargs="+", required=True,
                    help="presets (100m 350m 1b 3b) or PRESET:FIELD=VALUE,... e.g. tiny:d_model=96,d_ffn=288")
    pl.add_argument("--budgets", nargs="+", type=float, required=True,
                    help="training FLOPs per point, e.g. 2e19 4e19")
    pl.add_argument("--data", required=True, help="prepared data dir (train split for training, val for the NLL)")
    pl.add_argument("--out", type=Path, required=True, help="plan directory")
    pl.add_argument("--seq-len", type=int, default=d.seq_len)
    pl.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size)
    pl.add_argument("--ranks", type=int, default=d.ranks, help="data-parallel ranks each run will use")
    pl.add_argument("--batch-tokens", type=int, default=PAPER_BATCH_TOKENS, help="largest tokens per step")
    pl.add_argument("--min-steps", type=int, default=d.min_steps, help="halve the batch until a run has these")
    pl.add_argument("--val-batches", type=int, default=d.val_batches, help="final validation batches")
    pl.add_argument("--throughput", type=Path, help="a finished run dir whose tokens/s prices the grid")
    pl.add_argument("--flops-per-gpu-s", type=float, help="achieved FLOP/s per device, instead of --throughput")
    pl.add_argument("--set", dest="extra", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="a trainer flag for every point (repeatable), e.g. --set=--train.device=cpu")
    r = sub.add_parser("run", help="train the plan's points (resumable), or render cluster jobs")
    r.add_argument("plan", type=Path)
    r.add_argument("--nproc-per-node", type=int, default=1, help="local: torchrun processes per point")
    r.add_argument("--render", choices=("slurm", "k8s"),
                   help="write launch.render jobs + submit.sh instead; launch.render options follow --")
    f = sub.add_parser("fit", help="isoFLOP parabolas and power laws -> fit.json, isoflop.png, laws.png")
    f.add_argument("plan", type=Path)
    f.add_argument("--out", type=Path, help="default: the plan directory")
    return p


def cmd_plan(args: argparse.Namespace) -> None:
    from pretrain.scaling.plan import GridSpec, PlanError, describe, make_plan, measured_flops_per_gpu_s

    for name in ("seq_len", "micro_batch_size", "ranks", "min_steps", "val_batches", "batch_tokens"):
        if getattr(args, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not all(0 < b < math.inf for b in args.budgets):
        raise PlanError(f"--budgets {' '.join(map(str, args.budgets))}: budgets are positive, finite FLOP counts")
    if args.flops_per_gpu_s is not None and not 0 < args.flops_per_gpu_s < math.inf:
        raise PlanError(f"--flops-per-gpu-s {args.flops_per_gpu_s}: an achieved FLOP/s per device is positive and "
                        "finite, e.g. 4e14")
    spec = GridSpec(args.archs, args.sizes, args.budgets, args.data, args.seq_len, args.micro_batch_size,
                    args.ranks, args.batch_tokens, args.min_steps, args.val_batches, args.extra)
    rate, source = args.flops_per_gpu_s, "--flops-per-gpu-s"
    if args.throughput:  # before anything is written: a bad --throughput leaves no plan behind
        rate, source = measured_flops_per_gpu_s(args.throughput)
    points = make_plan(spec, args.out)
    print(describe(points, rate, source))
    print(f"wrote {args.out / 'plan.json'} and {len(points)} configs under {args.out / 'points'}")


def check_batches_split(spec, points: list, nproc: int) -> None:
    """Every point's batch splits over the data-parallel ranks of `nproc` processes (those left by
    any parallel.tp/pp/cp the plan's --set gave), at start rather than as each point fails."""
    from pretrain.config import parse_args
    from pretrain.scaling.plan import PlanError

    par = parse_args(["--config", points[0].config])[0].parallel
    dp = max(1, nproc // (par.tp * par.pp * par.cp))
    window = dp * spec.micro_batch_size * spec.seq_len
    bad = next((p for p in points if p.batch_tokens % window), None)
    if bad is not None:
        raise PlanError(f"--nproc-per-node {nproc}: {bad.id}'s batch of {bad.batch_tokens:,} tokens is not a multiple "
                        f"of {dp} data-parallel ranks x micro-batch {spec.micro_batch_size} x seq_len {spec.seq_len}; "
                        f"run with the plan's --ranks {spec.ranks}, or plan again with --ranks {dp}")


def cmd_run(args: argparse.Namespace) -> int:
    from pretrain.scaling.plan import PlanError, read_plan
    from pretrain.scaling.run import render_jobs, run_local

    if args.nproc_per_node < 1:
        raise PlanError(f"--nproc-per-node {args.nproc_per_node}: must be >= 1")
    spec, points = read_plan(args.plan)
    if not args.render and points:
        check_batches_split(spec, points, args.nproc_per_node)
    if args.render:
        script = render_jobs(points, args.render, args.plan.resolve(), args.launch_args)
        print(f"wrote {script}")
        return 0
    try:
        outcome = run_local(points, args.nproc_per_node)
    except KeyboardInterrupt:  # the trainer has ended (run_forwarding_signals waits for it)
        print("interrupted; run again to continue from each point's last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    done = sum(v in ("skipped", "finished") for v in outcome.values())
    print(f"{done}/{len(points)} points finished")
    if "preempted" in outcome.values():
        return EXIT_PREEMPTED  # a launcher requeues; the next run resumes the point
    return 0 if done == len(points) else 1


def cmd_fit(args: argparse.Namespace) -> None:
    from data_pipeline.files import make_dir, write_atomic
    from pretrain.scaling.fit import fit
    from pretrain.scaling.observations import observations
    from pretrain.scaling.plan import budget_label, read_plan
    from pretrain.scaling.plots import plot_isoflops, plot_laws

    _, points = read_plan(args.plan)
    obs, missing, without_nll = observations(points)
    out = args.out or args.plan
    make_dir(out)
    fits = fit(obs)
    files = {"isoflop": plot_isoflops(fits, out / "isoflop.png").name, "laws": plot_laws(fits, out / "laws.png").name}
    write_atomic(out / "fit.json", json.dumps({"plan": str(args.plan), "missing": missing, "without_nll": without_nll,
                                               "fits": fits, "plots": files}, indent=1, allow_nan=False) + "\n")
    for arch, f in fits.items():
        for curve in f["isoflop"]:
            opt, budget = curve["optimum"], budget_label(curve["budget"])
            if opt is None:
                print(f"{arch}: C={budget}: no optimum ({curve['why']})")
            else:
                where = "" if opt["inside_grid"] else " (outside the sizes tried: left out of the laws)"
                print(f"{arch}: C={budget}: N_opt {opt['params']:.3g}, D_opt {opt['tokens']:.3g}, "
                      f"{opt['tokens_per_param']:.1f} tokens/parameter, NLL {opt['nll']:.4f}{where}")
        for key, law in (("N_opt", f["n_opt"]), ("D_opt", f["d_opt"])):
            if law:
                err = f" +- {law['exponent_stderr']:.3f}" if law["exponent_stderr"] is not None else ""
                print(f"{arch}: {key} ~ C^{law['exponent']:.3f}{err}")
    if missing:
        print(f"not finished (left out of the fit): {', '.join(missing)}")
    if without_nll:
        print(f"finished without a finite validation NLL (left out of the fit; diverged, or an empty validation "
              f"split: see each run's summary.json and metrics.jsonl): {', '.join(without_nll)}")
    print(f"wrote {out / 'fit.json'}, {out / 'isoflop.png'}, {out / 'laws.png'}")


def main(argv: list[str] | None = None) -> int:
    from pretrain.hf import CliError
    from pretrain.scaling.plan import PlanError

    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.launch_args = argv[cut + 1:]
    try:
        if args.launch_args and not (args.cmd == "run" and args.render):
            raise PlanError(f"arguments after -- ({' '.join(args.launch_args)}) are launch.render options; "
                            "they go with `run PLAN --render slurm|k8s`")
        if args.cmd == "plan":
            cmd_plan(args)
        elif args.cmd == "run":
            return cmd_run(args)
        else:
            cmd_fit(args)
    except (PlanError, CliError, OSError, ValueError) as err:
        print(f"{PROG} {args.cmd}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
