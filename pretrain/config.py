"""Run configuration: dataclass sections, filled from defaults, then a TOML file, then the CLI.

Every value is checked against its field's type as it arrives, so a typo or a bad value fails at
start with one line naming the source, the key and the fix, never hours into a run.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import tomllib
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import tomli_w


class ConfigError(ValueError):
    """A bad configuration value; the message names where it came from, the key and the fix."""


@dataclass
class ModelSection:
    arch: str = "hybrid_moe"
    size: str = "tiny"
    # Hybrids: attention (or intra-hybrid) blocks to Mamba blocks, e.g. "1:3"; the depth follows the
    # paper's rule (the preset's size is kept). Empty: the preset's (1:5).
    ratio: str = ""
    placement: str = ""  # inter: front | middle | end; intra: scatter | cluster | sandwich; empty: preset's
    # ModelConfig field names -> values, e.g. {vocab_size = 8192}; checked against ModelConfig.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    # Prepared data directories, each "DIR" or "DIR:WEIGHT" (weights of a mixture, default 1).
    sources: list[str] = field(default_factory=list)
    seq_len: int = 1024
    num_workers: int = 0
    # Canonical streams that fix the data order (data_pipeline/streams.py); must be a multiple of
    # the data-parallel size. 0: the run's own - a resumed run keeps its checkpoint's count, a
    # fresh one takes lcm(64, dp size) (64 up to 64 ranks, 128 for 16 nodes x 8 GPUs).
    num_streams: int = 0
    # true: no attention or Mamba2 state flows from one packed document into the next (positions
    # restart per document); false: the paper's cross-document packing. Recorded in the
    # checkpoint: a resume that changes it fails unless allow_document_masking_change is true.
    document_masking: bool = False
    allow_document_masking_change: bool = False


@dataclass
class OptimSection:
    lr: float = 6e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class ScheduleSection:
    kind: str = "trapezoid"  # trapezoid | wsd | cosine | constant
    warmup_frac: float = 0.25
    cooldown_frac: float = 0.2  # trapezoid/wsd: final fraction decayed linearly (wsd: 1-sqrt)
    min_lr_ratio: float = 0.0  # floor of the decay, as a fraction of optim.lr


@dataclass
class TrainSection:
    steps: int = 1000
    global_batch_tokens: int = 0  # 0: one micro-batch per data-parallel rank per step
    micro_batch_size: int = 8
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on cuda, fp32 on cpu) | bf16 | fp32
    val_every: int = 200  # 0 disables periodic validation
    val_batches: int = 16
    max_bad_steps: int = 5  # consecutive NaN/inf steps before the run stops
    activation_checkpointing: bool = False  # recompute each block in backward (memory for ~1/3 more compute)
    ac_mode: str = "full"  # full | selective (save matmul/attention/scan outputs, recompute cheap ops)
    compile: bool = False  # torch.compile each block
    fp8: str = "none"  # none | tensorwise | rowwise: torchao float8 for the large linears (CUDA sm >= 8.9)


@dataclass
class CheckpointSection:
    enabled: bool = True  # false: never save (throughput benchmarks); resume still reads
    every: int = 500  # 0: only at the end and on preemption
    keep: int = 3
    async_save: bool = False
    resume_from: str = ""  # a checkpoint directory; empty: newest complete one in the run dir
    init_from: str = ""  # fresh run starting from these model weights (e.g. `pretrain.hf import`)
    init_from_partial: bool = False  # init_from may hold tensors this model has no place for: leave them out


@dataclass
class LoggingSection:
    log_every: int = 10
    tensorboard: bool = True
    peak_tflops: float = 989.0  # per device, dense bf16 (H100/H200 SXM); MFU is against this


@dataclass
class ParallelSection:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: all ranks not used by other dimensions
    tp: int = 1  # tensor + sequence parallel ranks (within a node: they talk every layer)
    cp: int = 1  # context parallel ranks: each holds 1/cp of every sequence (long context)
    ep: int = 1  # expert parallel ranks, borrowed from dp_shard x cp: each holds 1/ep of every MoE layer's experts
    pp: int = 1  # pipeline stages' ranks: each holds a contiguous part of the blocks (docs/parallelism.md)
    pp_schedule: str = "1f1b"  # 1f1b | interleaved_1f1b | zbv | dualpipev (torch.distributed.pipelining)
    pp_microbatches: int = 0  # pipeline microbatches per train.micro_batch_size batch; 0: pp


@dataclass
class JobConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SCHEDULE_KINDS = ("trapezoid", "wsd", "cosine", "constant")
COOLDOWN_KINDS = ("trapezoid", "wsd")  # the kinds schedule.cooldown_frac shapes


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Convert a TOML or CLI value to the field type, or raise naming the key."""
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):  # "2e6" is an integer; "1.5e0" is not (Decimal: no float rounding)
                exact = Decimal(value)
                if exact != exact.to_integral_value():
                    raise ValueError
                return int(exact)
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            return [_coerce(v, item_tp, key, source) for v in value]
        if origin is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
    except (ValueError, TypeError, OverflowError, InvalidOperation):  # TypeError: a list or a date for a number
        pass
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{source}: {key}={value!r} is not a valid {name}; fix the value")


def _set(cfg: JobConfig, key: str, value: Any, source: str) -> None:
    """Set a dotted key (`optim.lr`, `model.overrides.d_model`) on cfg, type-checked."""
    parts = key.split(".")
    if len(parts) >= 3 and parts[0] == "model" and parts[1] == "overrides":
        _set_override(cfg, ".".join(parts[2:]), _parse_literal(value), source)
        return
    obj: Any = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{source}: unknown key '{key}' ({where} has: {', '.join(names)}); fix the name")
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(obj))
            if dataclasses.is_dataclass(hints[part]):
                raise ConfigError(f"{source}: '{key}' is a section; set one of its keys, e.g. {key}.<name>=...")
            setattr(obj, part, _coerce(value, hints[part], key, source))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{source}: '{'.'.join(parts[:i + 1])}' is not a section; fix the key '{key}'")


def _set_override(cfg: JobConfig, key: str, value: Any, source: str) -> None:
    """One model.overrides entry, its name checked against ModelConfig here, where the source is
    known. A table becomes one dotted key per field (`moe={top_k=2}` is `moe.top_k=2`), so that a
    table and dotted keys of one section never depend on their order (which config.toml does not
    keep); an empty table stays (`moe={}` turns the MoE on). A string for a bool or number field, or
    an integral float for an int field, is read as the other config keys are ('no', '2e6', 1 for
    true); "none" unsets an optional field (TOML has no null: `rope.factor=none` turns RoPE scaling
    off)."""
    from pretrain.model.config import field_type, override_error, scalar_type

    why = override_error(key, value)
    if why:
        raise ConfigError(f"{source}: model.overrides.{key}: {why}; fix the name (fields: pretrain/model/config.py)")
    if isinstance(value, dict) and value:
        for name, entry in value.items():
            _set_override(cfg, f"{key}.{name}", entry, source)
        return
    scalar = scalar_type(key)
    if isinstance(value, str) and value.lower() == "none" and type(None) in typing.get_args(field_type(key)):
        value = None
    elif isinstance(value, str) and scalar is not None or isinstance(value, float) and scalar is int or \
            scalar is bool and value in (0, 1) and not isinstance(value, bool):
        value = _coerce(str(value) if scalar is bool else value, scalar, f"model.overrides.{key}", source)
    cfg.model.overrides.pop(key, None)  # set again: the later value, last
    cfg.model.overrides[key] = value


def _parse_literal(value: Any) -> Any:
    """CLI override values for the model: a TOML literal (1, 2.5, true, "x", [1,2]) or a bare string."""
    if not isinstance(value, str):
        return value
    try:
        return tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return value


def apply_toml(cfg: JobConfig, path: str | Path) -> None:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; fix the --config path")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML ({e}); fix the syntax") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start}: {e.reason}); TOML files are UTF-8, fix the file") \
            from None
    for key, value in leaves(table, keep=("model.overrides",)):
        if key == "model.overrides":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: model.overrides must be a table; fix the value")
            for name, entry in value.items():
                _set_override(cfg, name, entry, str(path))
        else:
            _set(cfg, key, value, str(path))


def validate(cfg: JobConfig) -> None:
    """Range and consistency checks that types alone cannot express."""
    def bad(key: str, why: str) -> None:
        raise ConfigError(f"config: {key} {why}")

    for key, v in leaves(cfg.to_dict()):
        if isinstance(v, float) and not math.isfinite(v):
            bad(key, f"= {v} must be a finite number; fix the value")
        if isinstance(v, int) and not isinstance(v, bool) and not -2**63 <= v < 2**63 and "overrides" not in key:
            bad(key, f"= {v} does not fit 64 bits; fix the value")
    positive = {"data.seq_len": cfg.data.seq_len, "train.steps": cfg.train.steps,
                "train.micro_batch_size": cfg.train.micro_batch_size, "optim.lr": cfg.optim.lr,
                "optim.eps": cfg.optim.eps,
                "checkpoint.keep": cfg.checkpoint.keep, "logging.log_every": cfg.logging.log_every,
                "logging.peak_tflops": cfg.logging.peak_tflops, "train.max_bad_steps": cfg.train.max_bad_steps}
    for key, v in positive.items():
        if v <= 0:
            bad(key, f"= {v} must be > 0; fix the value")
    non_negative = {"train.global_batch_tokens": cfg.train.global_batch_tokens, "train.val_every": cfg.train.val_every,
                    "train.val_batches": cfg.train.val_batches, "checkpoint.every": cfg.checkpoint.every,
                    "data.num_workers": cfg.data.num_workers, "data.num_streams": cfg.data.num_streams,
                    "optim.grad_clip": cfg.optim.grad_clip,
                    "optim.weight_decay": cfg.optim.weight_decay, "train.seed": cfg.train.seed}
    for key, v in non_negative.items():
        if v < 0:
            bad(key, f"= {v} must be >= 0; fix the value")
    if cfg.train.val_every > 0 and cfg.train.val_batches == 0:
        bad("train.val_batches", f"= 0 validates on nothing every {cfg.train.val_every} steps; give it batches, or "
                                 "turn validation off with train.val_every=0")
    for key, v in (("optim.beta1", cfg.optim.beta1), ("optim.beta2", cfg.optim.beta2)):
        if not 0 <= v < 1:
            bad(key, f"= {v} must lie in [0, 1); fix the value (AdamW's usual: beta1 0.9, beta2 0.95)")
    if cfg.schedule.kind not in SCHEDULE_KINDS:
        bad("schedule.kind", f"= {cfg.schedule.kind!r} must be one of {', '.join(SCHEDULE_KINDS)}")
    s = cfg.schedule
    cooldown = s.cooldown_frac if s.kind in COOLDOWN_KINDS else 0.0  # cosine and constant have none
    if not (0 <= s.warmup_frac <= 1 and 0 <= s.cooldown_frac <= 1 and s.warmup_frac + cooldown <= 1):
        bad("schedule.warmup_frac", "and schedule.cooldown_frac must lie in [0, 1] and sum to <= 1; fix them")
    if not 0 <= s.min_lr_ratio <= 1:
        bad("schedule.min_lr_ratio", f"= {s.min_lr_ratio} must lie in [0, 1]")
    for key, v in (("train.device", cfg.train.device), ("train.dtype", cfg.train.dtype)):
        allowed = ("auto", "cpu", "cuda") if key == "train.device" else ("auto", "bf16", "fp32")
        if v not in allowed:
            bad(key, f"= {v!r} must be one of {', '.join(allowed)}")
    if cfg.train.ac_mode not in ("full", "selective"):
        bad("train.ac_mode", f"= {cfg.train.ac_mode!r} must be one of full, selective")
    if cfg.train.fp8 not in ("none", "tensorwise", "rowwise"):
        bad("train.fp8", f"= {cfg.train.fp8!r} must be one of none, tensorwise, rowwise")
    for src in cfg.data.sources:
        parse_source(src)
    if cfg.parallel.dp_replicate < 1:
        bad("parallel.dp_replicate", f"= {cfg.parallel.dp_replicate} must be >= 1; fix the value")
    if cfg.parallel.dp_shard < 1 and cfg.parallel.dp_shard != -1:
        bad("parallel.dp_shard", f"= {cfg.parallel.dp_shard} must be >= 1 (or -1 for all remaining ranks)")
    for key in ("tp", "cp", "ep", "pp"):
        if getattr(cfg.parallel, key) < 1:
            bad(f"parallel.{key}", f"= {getattr(cfg.parallel, key)} must be >= 1; fix the value")
    from parallel.activation_checkpoint import SELECTIVE_IS_EAGER
    from parallel.pipeline import SCHEDULES, SPLIT_BACKWARD

    if cfg.parallel.pp_schedule not in SCHEDULES:
        bad("parallel.pp_schedule", f"= {cfg.parallel.pp_schedule!r} is unknown: choose one of {', '.join(SCHEDULES)}")
    if cfg.parallel.pp_microbatches < 0:
        bad("parallel.pp_microbatches", f"= {cfg.parallel.pp_microbatches} must be >= 1 (0: parallel.pp)")
    p, t = cfg.parallel, cfg.train
    split_backward = p.pp > 1 and p.pp_schedule in SPLIT_BACKWARD
    if t.activation_checkpointing and t.ac_mode == "selective" and split_backward:
        # fails in the first backward: the split backward runs the checkpointed region twice
        bad("train.ac_mode", f"= selective does not run with parallel.pp_schedule={p.pp_schedule} (a split "
                             "backward); use train.ac_mode=full")
    if t.compile and t.activation_checkpointing and t.ac_mode == "selective":
        bad("train.ac_mode", f"= selective {SELECTIVE_IS_EAGER}")
    if t.compile and split_backward:
        bad("train.compile", f"= true does not run with parallel.pp_schedule={p.pp_schedule} (its split backward "
                             "needs the graph kept, which compiled blocks' donated buffers do not allow); use "
                             "parallel.pp_schedule=1f1b or interleaved_1f1b, or train.compile=false")
    tp, cp = p.tp, p.cp
    split = tp * (2 * cp if cp > 1 else 1)  # CP: 2 chunks per rank (load balance), then TP's sequence shards
    if cfg.data.seq_len % split:
        bad("data.seq_len", f"= {cfg.data.seq_len} must be a multiple of {split} (parallel.tp={tp} sequence shards"
                            f"{f' of 2 x parallel.cp={cp} chunks' if cp > 1 else ''}); fix one of them")


# Model overrides that shape only some block kinds: (key, or section with its dot; kinds; whose).
BLOCK_OVERRIDES = (("intra.", "H", "intra-hybrid"), ("rope.", "AH", "global-attention or intra-hybrid"),
                   ("window", "S", "sliding-window"), ("n_sink", "S", "sliding-window"),
                   ("swa_rope_theta", "S", "sliding-window"), ("d_ssm", "M", "Mamba2"),
                   ("ssm_head_dim", "M", "Mamba2"), ("d_state", "M", "Mamba2"))


def unused_settings(cfg: JobConfig, blocks: Sequence[str] = ()) -> list[str]:
    """Settings given a value that does nothing in this config (a warning each at start, so nobody
    believes a pipeline schedule or selective checkpointing is on when it is not, or an ablation's
    intra-hybrid fusion built into a model without intra-hybrid blocks); `blocks`: the model's."""
    p, t, defaults = cfg.parallel, cfg.train, JobConfig()
    unused = []
    kinds = set(blocks)
    for key in cfg.model.overrides:
        for name, needs, whose in BLOCK_OVERRIDES:
            if kinds and (key == name or name.endswith(".") and key.startswith(name)) and not kinds & set(needs):
                unused.append(f"model.overrides.{key} does nothing without {whose} blocks (this model's: "
                              f"{''.join(sorted(kinds))})")
    if p.pp == 1:
        unused += [f"parallel.{key}={getattr(p, key)!r} does nothing with parallel.pp=1"
                   for key in ("pp_schedule", "pp_microbatches") if getattr(p, key) != getattr(defaults.parallel, key)]
    if not t.activation_checkpointing and t.ac_mode != defaults.train.ac_mode:
        unused.append(f"train.ac_mode={t.ac_mode!r} does nothing without train.activation_checkpointing=true")
    s = cfg.schedule
    if s.kind not in COOLDOWN_KINDS and s.cooldown_frac != defaults.schedule.cooldown_frac:
        unused.append(f"schedule.cooldown_frac={s.cooldown_frac} does nothing with schedule.kind={s.kind!r} (it "
                      f"shapes {' and '.join(COOLDOWN_KINDS)})")
    if s.kind == "constant" and s.min_lr_ratio != defaults.schedule.min_lr_ratio:
        unused.append(f"schedule.min_lr_ratio={s.min_lr_ratio} does nothing with schedule.kind='constant'")
    return unused


def parse_source(src: str) -> tuple[str, float]:
    """'DIR' or 'DIR:WEIGHT' -> (DIR, weight)."""
    path, sep, weight = src.rpartition(":")
    if not sep or "/" in weight or not weight:
        return src, 1.0
    try:
        w = float(weight)
    except ValueError:
        return src, 1.0
    if not (math.isfinite(w) and w > 0):
        raise ConfigError(f"config: data.sources entry {src!r} has weight {w}; weights must be finite and > 0")
    return path, w


# The trainer's shortcut flags and the config key each sets (--data is repeatable: data.sources).
SHORTCUT_KEYS = {"arch": "model.arch", "size": "model.size", "data": "data.sources", "run-dir": "run_dir",
                 "resume-from": "checkpoint.resume_from"}


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain/main.py", allow_abbrev=False,  # --run=X must not silently mean --run-dir=X
        description="Pretrain a hybrid Transformer/Mamba2(/MoE) LM. Any config key can be set as "
                    "--section.key=value, e.g. --optim.lr=3e-4 --train.steps=1000.")
    p.add_argument("--config", action="append", metavar="FILE",
                   help="TOML file; repeat to layer files (a later file's keys win); CLI flags override them")
    from pretrain.model.presets import ARCHS, SIZES

    p.add_argument("--arch", metavar="ARCH", help=f"model.arch preset: {', '.join(ARCHS)}")
    p.add_argument("--size", metavar="SIZE", help=f"model.size preset: {', '.join(SIZES)}")
    p.add_argument("--data", action="append", metavar="DIR[:WEIGHT]",
                   help="prepared data directory; repeat for a weighted mixture (data.sources)")
    p.add_argument("--run-dir", help="checkpoints, TensorBoard logs and summary.json go here")
    p.add_argument("--resume-from", help="checkpoint directory to resume from (checkpoint.resume_from)")
    p.add_argument("--dry-run", action="store_true",
                   help="build on the meta device, print config, parameters, FLOPs and memory, exit")
    p.add_argument("--world-size", type=int, metavar="N",
                   help="with --dry-run: lay the run out on N ranks (default: WORLD_SIZE; fake process group, meta "
                        "tensors) and print each representative rank's parameter/gradient/optimizer bytes and the "
                        "collectives per step")
    p.add_argument("--rank", type=int, action="append", metavar="R",
                   help="with a dry run of several ranks: a rank to report (repeatable; default: the first, the last "
                        "and the first of each pipeline stage)")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, argparse.Namespace]:
    """defaults < --config TOML files (in order) < shortcut flags and dotted overrides (a dotted key
    given twice: the later wins; a shortcut and its own dotted key together are refused)."""
    parser = build_arg_parser()
    args, rest = parser.parse_known_args(argv)
    overrides: list[tuple[str, str]] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"command line: unexpected argument {tok!r}; use --section.key=value")
        if "." not in tok.split("=", 1)[0]:
            raise ConfigError(f"command line: unknown option {tok.split('=', 1)[0]}; see --help, and use "
                              "--section.key=value for config keys")
        if "=" in tok:
            key, value = tok[2:].split("=", 1)
        elif i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            key, value = tok[2:], rest[i + 1]
            i += 1
        else:
            raise ConfigError(f"command line: {tok} has no value; write {tok}=VALUE")
        overrides.append((key, value))
        i += 1

    cfg = JobConfig()
    for path in args.config or ():
        apply_toml(cfg, path)
    dotted = {key.replace("-", "_") for key, _ in overrides}
    for flag, key in SHORTCUT_KEYS.items():
        value = getattr(args, flag.replace("-", "_"))
        if value is None:
            continue
        if key in dotted:  # which one wins would depend on an order the reader cannot see
            raise ConfigError(f"command line: --{flag} and --{key} both set {key}; keep one")
        if key == "data.sources":  # a list of DIR[:WEIGHT]
            cfg.data.sources = list(value)
        else:
            _set(cfg, key, value, "command line")
    for key, value in overrides:
        _set(cfg, key.replace("-", "_"), value, "command line")
    validate(cfg)
    return cfg, args


def leaves(table: dict[str, Any], prefix: str = "", keep: tuple[str, ...] = ()) -> list[tuple[str, Any]]:
    """(dotted key, value) of every value that is not a table, or is one of the tables `keep`."""
    out = []
    for k, v in table.items():
        key = f"{prefix}{k}"
        out.extend(leaves(v, key + ".", keep) if isinstance(v, dict) and key not in keep else [(key, v)])
    return out


def to_toml(cfg: JobConfig) -> str:
    """The resolved config as TOML that `--config` reads back to the same JobConfig (tomli-w:
    nested model.overrides tables, any string, floats to the last bit; an override unset to None
    as "none", which `_set_override` reads back as None)."""
    table = cfg.to_dict()
    table["model"]["overrides"] = {k: "none" if v is None else v for k, v in table["model"]["overrides"].items()}
    missing = [key for key, v in leaves(table) if v is None]
    if missing:
        raise ConfigError(f"config: {missing[0]} is None, which TOML cannot write; give the key a value")
    try:
        return tomli_w.dumps(table)
    except TypeError as e:
        raise ConfigError(f"config: a value has no TOML form ({e}); fix the config") from None
