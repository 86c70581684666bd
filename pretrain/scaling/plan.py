"""`plan`: architectures x sizes x FLOP budgets -> one trainer config per point and `plan.json`.

Tokens per point are the budget over the model's true training FLOPs per token
(`pretrain.accounting.flops_per_token`, LM head, attention and SSD terms included, at the run's
sequence length), rounded to whole steps; the compute actually spent is recorded beside the budget.
A size is a preset (`100m`) or a preset with ModelConfig overrides (`tiny:d_model=96,d_ffn=288`),
which is how a CPU test gets several sizes below 100M.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_pipeline.files import make_dir, write_atomic
from pretrain.config import SHORTCUT_KEYS
from pretrain.scaling.rules import PAPER_BATCH_TOKENS, batch_tokens, peak_lr

log = logging.getLogger(__name__)
PLAN_FILE = "plan.json"


class PlanError(ValueError):
    """Bad plan input: one line naming the option and the fix."""


@dataclass
class GridSpec:
    archs: list[str]
    sizes: list[str]
    budgets: list[float]
    data: str
    seq_len: int = 8192
    micro_batch_size: int = 1
    ranks: int = 1  # data-parallel ranks per run: the batch must split across them
    max_batch_tokens: int = PAPER_BATCH_TOKENS
    min_steps: int = 100
    val_batches: int = 16
    extra: list[str] = field(default_factory=list)  # more trainer flags for every point (--train.device=cpu)


@dataclass
class Point:
    id: str
    arch: str
    size: str
    budget: float
    params: int  # active non-embedding parameters (= non-embedding for dense models)
    total_params: int
    flops_per_token: float
    steps: int
    batch_tokens: int
    tokens: int  # steps x batch_tokens
    flops: float  # tokens x flops_per_token: the compute actually spent
    lr: float
    config: str  # trainer TOML
    run_dir: str


def parse_size(size: str) -> tuple[str, dict[str, str]]:
    """'tiny:d_model=96,d_ffn=288' -> ('tiny', {'d_model': '96', 'd_ffn': '288'})."""
    preset, _, rest = size.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise PlanError(f"--sizes {size!r}: '{item}' is not FIELD=VALUE; write e.g. tiny:d_model=96,d_ffn=288")
        overrides[key] = value
    return preset, overrides


def budget_label(budget: float) -> str:
    """The shortest scientific spelling that reads back as `budget` (1e+19 -> '1e19', 1.4e19 -> '1.4e19'),
    so two budgets never share a point id."""
    text = next(t for t in (f"{budget:.{d}e}" for d in range(17)) if float(t) == budget)
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def point_id(arch: str, size: str, budget: float) -> str:
    return f"{arch}-{re.sub(r'[^A-Za-z0-9]+', '_', size).strip('_')}-{budget_label(budget)}"


# trainer settings each point's numbers come from: a --set of one would train another point than the
# plan's (or never reach its planned step), so `plan` refuses it
PLANNED = ("model.arch", "model.size", "data.sources", "run_dir", "data.seq_len", "train.micro_batch_size",
           "train.global_batch_tokens", "train.steps", "optim.lr", "train.val_every", "train.val_batches",
           "checkpoint.resume_from", "config", "dry_run")


def check_extra(extra: list[str]) -> None:
    """Refuse --set flags of the settings the plan decides (PLANNED)."""
    for flag in extra:
        name = flag.lstrip("-").partition("=")[0]
        key = SHORTCUT_KEYS.get(name, name.replace("-", "_"))
        if key in PLANNED:
            raise PlanError(f"--set {flag}: {key} is set by the plan for each point; use the plan's own options "
                            "(--archs, --sizes, --budgets, --data, --seq-len, --micro-batch-size, --batch-tokens, "
                            "--val-batches) instead")


def check_unique(name: str, values: list) -> None:
    repeated = sorted({budget_label(v) if isinstance(v, float) else str(v) for v in values if values.count(v) > 1})
    if repeated:
        raise PlanError(f"--{name}: {', '.join(repeated)} given more than once; list each once")


def trainer_args(spec: GridSpec, arch: str, size: str, run_dir: Path, steps: int, batch: int, lr: float) -> list[str]:
    preset, overrides = parse_size(size)
    return ["--arch", arch, "--size", preset, "--data", spec.data, "--run-dir", str(run_dir),
            *(f"--model.overrides.{k}={v}" for k, v in overrides.items()),
            f"--data.seq_len={spec.seq_len}", f"--train.micro_batch_size={spec.micro_batch_size}",
            f"--train.global_batch_tokens={batch}", f"--train.steps={steps}", f"--optim.lr={lr:.3e}",
            "--schedule.kind=trapezoid", "--schedule.warmup_frac=0.25", "--schedule.cooldown_frac=0.2",
            f"--train.val_every={steps}", f"--train.val_batches={spec.val_batches}",
            f"--checkpoint.every={max(1, steps // 4)}", "--checkpoint.keep=1", *spec.extra]


def model_numbers(spec: GridSpec, arch: str, size: str) -> tuple[dict[str, int], float]:
    """(parameter counts, training FLOPs per token) of the model the trainer will build."""
    from pretrain.accounting import count_params, flops_per_token
    from pretrain.config import ConfigError, parse_args
    from pretrain.job import build_model_from_config

    try:
        cfg, _ = parse_args(trainer_args(spec, arch, size, Path("unused"), 1, spec.micro_batch_size * spec.seq_len
                                         * spec.ranks, 1e-3))
        model_cfg = build_model_from_config(cfg, device="meta").config
    except ConfigError as e:
        raise PlanError(f"--archs {arch} / --sizes {size}: {e}") from None
    params = count_params(model_cfg)
    return params, flops_per_token(model_cfg, spec.seq_len, params)["total"]


def make_plan(spec: GridSpec, out: Path) -> list[Point]:
    """Writes OUT/points/ID.toml (one trainer config each) and OUT/plan.json; returns the points."""
    from pretrain.config import parse_args, to_toml

    if not (spec.archs and spec.sizes and spec.budgets):
        raise PlanError("plan: --archs, --sizes and --budgets each need at least one value")
    for name, values in (("archs", spec.archs), ("sizes", spec.sizes), ("budgets", spec.budgets)):
        check_unique(name, values)
    check_extra(spec.extra)
    out = out.resolve()
    spec.data = str(Path(spec.data).resolve())
    window = spec.micro_batch_size * spec.seq_len * spec.ranks
    points, too_small, configs = [], [], {}
    for arch in spec.archs:
        for size in spec.sizes:
            params, fpt = model_numbers(spec, arch, size)
            for budget in sorted(spec.budgets):
                batch = batch_tokens(budget / fpt, spec.max_batch_tokens, window, spec.min_steps)
                pid = point_id(arch, size, budget)
                if budget / fpt / batch < 0.5:  # less than half a step of the smallest batch: no point
                    too_small.append(f"{arch} {size} at {budget:.3g} (one step of {batch:,} tokens: "
                                     f"{batch * fpt:.3g} FLOPs)")
                    continue
                steps = max(1, round(budget / fpt / batch))
                run_dir = out / "runs" / pid
                lr = peak_lr(params["active_non_embedding"])
                cfg, _ = parse_args(trainer_args(spec, arch, size, run_dir, steps, batch, lr))
                config = out / "points" / f"{pid}.toml"
                if config in configs:  # sizes whose names differ only in punctuation
                    raise PlanError(f"--sizes: two sizes give the point id {pid}; name them apart")
                configs[config] = to_toml(cfg)
                points.append(Point(pid, arch, size, budget, params["active_non_embedding"], params["total"], fpt,
                                    steps, batch, steps * batch, steps * batch * fpt, lr, str(config), str(run_dir)))
    if not points:
        raise PlanError(f"plan: every budget is too small for one step of its model ({too_small[0]}, ...); raise "
                        "--budgets, or lower --seq-len, --micro-batch-size or --ranks")
    for skipped in too_small:  # an isoFLOP grid's small-budget, large-model corners: left out, said so
        log.warning("plan: left out %s: the budget buys less than half a step", skipped)
    check_planned_alike(configs)
    dropped = sorted({p.id for p in previous_points(out)} - {p.id for p in points})
    if dropped:
        log.warning("plan: %d point(s) of the plan already in %s are not in this grid and leave plan.json (their "
                    "runs stay under runs/; list them again to keep them): %s", len(dropped), out, ", ".join(dropped))
    make_dir(out / "points")
    for config, text in configs.items():
        write_atomic(config, text)
    write_atomic(out / PLAN_FILE, json.dumps({"spec": asdict(spec), "points": [asdict(p) for p in points]},
                                             indent=1) + "\n")
    return points


def check_planned_alike(configs: dict[Path, str]) -> None:
    """A point already planned in this directory must be planned the same way: its run may have
    trained, and `run` would resume it under the new settings and count it as the new point. Points
    not planned before (a grid extended by a budget or a size) are welcome."""
    for config, text in configs.items():
        if config.is_file() and config.read_text() != text:
            raise PlanError(f"--out {config.parent.parent}: point {config.stem} is already planned there with other "
                            f"settings ({config}); plan into a new --out, or delete that one")


def previous_points(out: Path) -> list[Point]:
    """The points of a plan already in `out` (none when there is none, or it does not read)."""
    try:
        return read_plan(out)[1]
    except PlanError:
        return []


def read_plan(plan_dir: Path) -> tuple[GridSpec, list[Point]]:
    path = plan_dir / PLAN_FILE
    if not path.is_file():
        raise PlanError(f"{plan_dir}: no {PLAN_FILE}; make one with `python -m pretrain.scaling plan --out {plan_dir}`")
    try:
        data = json.loads(path.read_text())
        return GridSpec(**data["spec"]), [Point(**p) for p in data["points"]]
    except (ValueError, TypeError, KeyError) as e:
        raise PlanError(f"{path}: not a plan written by `plan` ({type(e).__name__}: {e}); make it again with "
                        "`python -m pretrain.scaling plan`") from None


def gpu_hours(points: list[Point], flops_per_gpu_s: float) -> float:
    return sum(p.flops for p in points) / flops_per_gpu_s / 3600


def measured_flops_per_gpu_s(run_dir: Path) -> tuple[float, str]:
    """Achieved training FLOP/s per device of a finished run: median logged tokens/s x its model's
    FLOPs per token / its world size. The grid's cost assumes every point reaches the same."""
    import statistics

    from pretrain.accounting import flops_per_token
    from pretrain.hf import read_model_config, read_run_config

    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics.is_file() or not summary.is_file():
        raise PlanError(f"--throughput {run_dir}: not a run dir (needs metrics.jsonl and summary.json)")
    tps = [r["perf/tokens_per_s"] for r in map(json.loads, metrics.read_text().splitlines())
           if "perf/tokens_per_s" in r]
    if not tps:
        raise PlanError(f"--throughput {run_dir}: its metrics.jsonl logged no perf/tokens_per_s; use a run that "
                        "trained past logging.log_every")
    saved = json.loads(summary.read_text()).get("checkpoint")
    # summary.json names it as the trainer was given the run dir: relative to where that ran
    ckpt = run_dir / "checkpoints" / Path(saved).name if saved else None
    if ckpt is None or not (ckpt / "model_config.json").is_file():
        raise PlanError(f"--throughput {run_dir}: its summary.json names no checkpoint under {run_dir / 'checkpoints'} "
                        f"({saved!r}); use a run that saved one")
    seq_len = read_run_config(ckpt)["data"]["seq_len"]
    world = json.loads(summary.read_text()).get("world_size") or 1
    fpt = flops_per_token(read_model_config(ckpt), seq_len)["total"]
    median = statistics.median(tps)
    return median * fpt / world, f"{run_dir}: {median:,.0f} tokens/s on {world} device(s) x {fpt:.3e} FLOPs/token"


def describe(points: list[Point], flops_per_gpu_s: float | None, source: str) -> str:
    """The grid as a table, and its cost."""
    head = f"{'point':<42} {'params':>12} {'FLOPs/tok':>10} {'tokens':>12} {'tok/param':>9} {'steps':>7} " \
           f"{'batch':>9} {'lr':>8}"
    lines = [head]
    for p in points:
        lines.append(f"{p.id:<42} {p.params:>12,} {p.flops_per_token:>10.3e} {p.tokens:>12,} "
                     f"{p.tokens / p.params:>9.1f} {p.steps:>7} {p.batch_tokens:>9,} {p.lr:>8.2e}")
    total = sum(p.flops for p in points)
    lines.append(f"{len(points)} runs, {total:.3e} FLOPs in all")
    if flops_per_gpu_s:
        lines.append(f"cost: {gpu_hours(points, flops_per_gpu_s):,.2f} GPU-hours at {flops_per_gpu_s:.3e} "
                     f"FLOP/s per device ({source})")
    else:
        lines.append("cost: pass --throughput RUN_DIR (a measured run) or --flops-per-gpu-s for GPU-hours")
    return "\n".join(lines)

