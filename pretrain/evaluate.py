"""Evaluate checkpoints: the paper's analyses as one command.

    python -m pretrain.evaluate --checkpoint RUN_DIR_OR_STEP [...] --suite nll,positions,niah,inference --out DIR
    python -m pretrain.evaluate compare OUT_A OUT_B ... --out DIR

Writes DIR/results.json (every number) and PNG figures beside it; several checkpoints share one
figure per suite, so architectures compare directly. Runs on CPU or GPU; a checkpoint of any
parallel layout loads. Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

PROG = "python -m pretrain.evaluate"
EXIT_USAGE = 2


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def build_parser() -> argparse.ArgumentParser:
    from pretrain.evaluation.runner import DEFAULT_SUITES, SUITES, Options

    d = Options()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                   help="run dirs (newest verified checkpoint) or step_* dirs")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES), help=f"comma-separated, from {','.join(SUITES)}")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and the PNGs")
    p.add_argument("--data", default=d.data, help="prepared dir to evaluate on (default: each run's first source)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda where available")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"), help="auto: bf16 on cuda")
    p.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="training length the suites scale from, and the nll window (default: the run's "
                        "data.seq_len, which training FLOPs are counted at in any case)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="nll sequences per batch")
    p.add_argument("--nll-batches", type=int, default=d.nll_batches, help="limit (default: the whole split)")
    p.add_argument("--positions-multiple", type=float, default=d.positions_multiple,
                   help="positions: context length as a multiple of the training length")
    p.add_argument("--positions-docs", type=int, default=d.positions_docs, help="positions: documents averaged")
    p.add_argument("--niah-lengths", type=_floats, default=d.niah_lengths,
                   help="niah: context lengths as multiples of the training length")
    p.add_argument("--niah-depths", type=_floats, default=d.niah_depths, help="niah: needle depths in [0, 1]")
    p.add_argument("--niah-trials", type=int, default=d.niah_trials, help="niah: needles per cell")
    p.add_argument("--inference-batch", type=int, default=d.inference_batch, help="inference: sequences decoded together")
    p.add_argument("--inference-prompt", type=int, default=d.inference_prompt,
                   help="prompt tokens (default: training length / 16)")
    p.add_argument("--inference-totals", type=_ints, default=d.inference_totals,
                   help="total lengths (default: training length x 0.25,0.5,1,2,4)")
    p.add_argument("--fewshot-tasks", default=",".join(d.fewshot_tasks), help="lm-eval task names")
    p.add_argument("--fewshot-limit", type=int, default=d.fewshot_limit, help="examples per task (default: all)")
    p.add_argument("--fewshot-include", default=d.fewshot_include, help="directory of local lm-eval task YAMLs")
    p.add_argument("--seed", type=int, default=d.seed, help="needle placement, document choice and few-shot sampling")
    return p


def check_options(args: argparse.Namespace) -> list[str]:
    """The suites, after refusing values no suite can use (one line each)."""
    from pretrain.evaluation.runner import SUITES

    suites = [s for s in args.suite.split(",") if s]
    unknown = [s for s in suites if s not in SUITES]
    if unknown or not suites:
        raise ValueError(f"--suite {args.suite!r}: unknown {unknown}; choose from {','.join(SUITES)}")
    if not all(0 <= d <= 1 for d in args.niah_depths):
        raise ValueError(f"--niah-depths {args.niah_depths}: depths are fractions in [0, 1]")
    for name in ("batch_size", "positions_docs", "niah_trials", "inference_batch", "seq_len", "nll_batches",
                 "inference_prompt", "fewshot_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not all(0 < m < math.inf for m in (args.positions_multiple, *args.niah_lengths)):
        raise ValueError("--positions-multiple and --niah-lengths must be positive and finite")
    if "fewshot" in suites and not args.fewshot_tasks:
        raise ValueError("--suite fewshot needs --fewshot-tasks (lm-eval task names, comma-separated)")
    if "fewshot" in suites and args.fewshot_include is not None and not Path(args.fewshot_include).is_dir():
        raise ValueError(f"--fewshot-include {args.fewshot_include}: not a directory; pass the directory that holds "
                         "the task YAMLs")
    return suites


def run(argv: list[str]) -> None:
    import torch

    from data_pipeline.files import make_dir
    from pretrain.evaluation.runner import Options, check_subject, evaluate
    from pretrain.evaluation.subject import label_subjects, load_subject

    args = build_parser().parse_args(argv)
    suites = check_options(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda") \
        else torch.float32
    opts = Options(**{k: v for k, v in vars(args).items() if k in Options.__dataclass_fields__})
    opts.fewshot_tasks = tuple(t for t in args.fewshot_tasks.split(",") if t)
    if "fewshot" in suites:
        from pretrain.evaluation.fewshot import harness

        harness().check_tasks(opts.fewshot_tasks, opts.fewshot_include)
    if args.data is not None and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data}: no such directory; pass a prepared data dir (or leave --data out: "
                         "each run's own data)")
    make_dir(args.out)  # before minutes of evaluation, not after
    subjects = [load_subject(path, args.seq_len) for path in args.checkpoint]
    for subject in subjects:  # every checkpoint's inputs, before the first suite runs
        check_subject(subject, suites, opts, device, dtype)
    label_subjects(subjects)
    results = evaluate(subjects, suites, opts, args.out, device, dtype, log=lambda m: print(m, flush=True))
    print(f"wrote {args.out / 'results.json'} and {len(results['plots'])} figures")


def compare_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} compare", description="side-by-side table and figures")
    p.add_argument("results", type=Path, nargs="+", help="directories written by --out")
    p.add_argument("--out", type=Path, required=True)
    return p


def run_compare(argv: list[str]) -> None:
    from pretrain.evaluation.compare import compare

    args = compare_parser().parse_args(argv)
    print(compare(args.results, args.out), end="")
    print(f"wrote {args.out / 'compare.md'}, compare.json and the figures")


def main(argv: list[str] | None = None) -> int:
    from pretrain.hf import CliError

    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["compare"]:
            run_compare(argv[1:])
        else:
            run(argv)
    except (CliError, ValueError, OSError) as err:  # DataInputError is a ValueError naming file, field, fix
        print(f"{PROG}: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
