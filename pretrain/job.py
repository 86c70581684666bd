"""What a run's config resolves to before anything trains - the model, the parallel layout, the
pipeline stages, the batch's accumulation, the data streams - shared by the trainer and the dry run
(`pretrain.layout`), each refusal a one-line ConfigError naming the field and the fix."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from parallel.mesh import ParallelDims
from parallel.pipeline import check_schedule, stages_per_rank
from pretrain.config import ConfigError, JobConfig, parse_source
from pretrain.model.config import ModelConfig


def resolve_vocab(cfg: JobConfig) -> int | None:
    """The vocabulary size the data was tokenized with (all sources must agree)."""
    if not cfg.data.sources:
        return None
    from data_pipeline.manifest import read_manifest

    sizes = {}
    for src in cfg.data.sources:
        path, _ = parse_source(src)
        try:
            sizes[path] = read_manifest(path).vocab_size
        except ValueError as e:  # DataInputError: already names the file, field and fix
            raise ConfigError(f"data.sources: {e}") from None
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"config: data.sources have different vocabulary sizes {sizes}; "
                          "prepare all sources with one tokenizer")
    return next(iter(sizes.values()))


def model_overrides(cfg: JobConfig) -> dict[str, Any]:
    """model.overrides (dotted keys and tables in their order, which `model_config` merges) with the
    data's vocabulary size filled in."""
    overrides = dict(cfg.model.overrides)
    vocab = resolve_vocab(cfg)
    if vocab is not None:
        if "vocab_size" in overrides and overrides["vocab_size"] != vocab:
            raise ConfigError(f"config: model.overrides.vocab_size={overrides['vocab_size']} but the data was "
                              f"tokenized with vocab_size={vocab}; drop the override")
        overrides["vocab_size"] = vocab
    return overrides


def build_model_from_config(cfg: JobConfig, device: str | torch.device = "cpu") -> nn.Module:
    from pretrain.model import build_model

    m = cfg.model
    overrides = model_overrides(cfg)
    try:
        return build_model(m.arch, m.size, device=device, ratio=m.ratio or None, placement=m.placement or None,
                           **overrides)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"config: model (arch={m.arch!r}, size={m.size!r}, ratio={m.ratio!r}, "
                          f"placement={m.placement!r}, overrides={m.overrides}): {e}") from None


def parallel_dims(cfg: JobConfig, world_size: int) -> ParallelDims:
    """The parallel layout of `cfg` on `world_size` ranks (the trainer's and the dry run's)."""
    p = cfg.parallel
    try:
        return ParallelDims(pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp,
                            ep=p.ep).resolve(world_size)
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def pipeline_plan(cfg: JobConfig, model_cfg: ModelConfig) -> tuple[tuple[tuple[int, int], ...], int]:
    """(every pipeline stage's [start, end) blocks, stages per pp rank) of a parallel.pp > 1 run:
    the pattern's `|` marks, else stages balanced by the accounting's FLOPs per block (the head's
    on the last stage). Refuses, naming the field, what the layout cannot run."""
    from pretrain.accounting import block_flops_per_token
    from pretrain.model.pattern import STAGE_BOUNDARY, parse_pattern, pipeline_stages

    p = cfg.parallel
    microbatches = p.pp_microbatches or p.pp
    try:
        check_schedule(p.pp_schedule, p.pp, microbatches, cfg.train.micro_batch_size)
        if model_cfg.tie_embeddings:
            raise ValueError("parallel.pp > 1 needs untied embeddings (the embedding sits on the first stage, the head "
                             "on the last): set model.overrides.tie_embeddings=false")
        marked = len(parse_pattern(model_cfg.pattern).stages) if STAGE_BOUNDARY in model_cfg.pattern else None
        per_rank = stages_per_rank(p.pp_schedule, marked, p.pp)
        costs = block_flops_per_token(model_cfg, cfg.data.seq_len)
        costs[-1] += 6 * model_cfg.d_model * model_cfg.vocab_size  # the head (and loss) on the last stage
        return pipeline_stages(model_cfg.pattern, p.pp * per_rank, costs), per_rank
    except ValueError as e:
        raise ConfigError(f"config: {e}") from None


def wrap_options(cfg: JobConfig, param_dtype: torch.dtype) -> dict[str, Any]:
    """`parallelize_hybrid`'s keywords from the config: the trainer's and the dry run's are one."""
    return dict(param_dtype=param_dtype, activation_checkpointing=cfg.train.activation_checkpointing,
                compile=cfg.train.compile, fp8=cfg.train.fp8, ac_mode=cfg.train.ac_mode)


def grad_accum_steps(cfg: JobConfig, dp_size: int) -> int:
    """Micro-batches per optimizer step that fill train.global_batch_tokens (0: one)."""
    t = cfg.train
    per_micro = t.micro_batch_size * cfg.data.seq_len * dp_size
    if t.global_batch_tokens == 0:
        return 1
    if t.global_batch_tokens % per_micro:
        raise ConfigError(f"config: train.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
                          f"{dp_size} data-parallel ranks x train.micro_batch_size {t.micro_batch_size} x "
                          f"data.seq_len {cfg.data.seq_len} = {per_micro} tokens; {batch_fixes(cfg, dp_size)}")
    return t.global_batch_tokens // per_micro


def batch_fixes(cfg: JobConfig, dp_size: int) -> str:
    """Every way to make the global batch fit the ranks: smaller micro-batches (more gradient
    accumulation steps), a global batch that is a multiple of one micro-step, or none at all."""
    t, seq = cfg.train, cfg.data.seq_len
    per_micro = t.micro_batch_size * seq * dp_size
    # a pipeline splits each micro-batch into its microbatches: only their multiples are fixes
    split = (cfg.parallel.pp_microbatches or cfg.parallel.pp) if cfg.parallel.pp > 1 else 1

    def accumulation(micro_batch: int, tokens: int) -> str:
        n = tokens // (micro_batch * seq * dp_size)
        return f"{n} accumulation step{'s' * (n > 1)}"

    micro = [f"{m} ({accumulation(m, t.global_batch_tokens)})" for m in range(t.micro_batch_size - 1, 0, -1)
             if t.global_batch_tokens % (m * seq * dp_size) == 0 and m % split == 0]
    up = -(-t.global_batch_tokens // per_micro) * per_micro
    fixes = ([f"lower train.micro_batch_size to {' or '.join(micro[:3])}"] if micro else []) + [
        f"set train.global_batch_tokens to a multiple of {per_micro} (e.g. {up}: "
        f"{accumulation(t.micro_batch_size, up)})",
        f"or set it to 0 (one micro-batch per rank per step, {per_micro} tokens)"]
    return "fix: " + "; ".join(fixes)


def check_document_masking(cfg: JobConfig, saved: dict[str, Any] | None) -> None:
    """A resumed run keeps its checkpoint's data.document_masking (the loss would change meaning
    mid-run) unless data.allow_document_masking_change; checkpoints without the key had it off."""
    if saved is None or cfg.data.allow_document_masking_change:
        return
    was = bool(saved["data"]["document_masking"])
    if was != cfg.data.document_masking:
        raise ConfigError(f"config: data.document_masking={str(cfg.data.document_masking).lower()} but checkpoint "
                          f"{saved['path']} was trained with {str(was).lower()}; drop the change, or set "
                          "data.allow_document_masking_change=true to switch mid-run")


def resolve_num_streams(configured: int, dp_size: int, saved: int | None = None) -> int:
    """data.num_streams of this run: a resumed checkpoint's `saved` count (the data order must not
    change mid-run), else as configured, else lcm(64, dp_size). The dp size must divide it."""
    if saved is not None and configured and configured != saved:
        raise ConfigError(f"config: data.num_streams={configured} but the checkpoint's data order has {saved} "
                          "streams; drop the override (0 keeps the checkpoint's)")
    count = saved or configured
    if not count:
        return math.lcm(64, dp_size)
    if count % dp_size:
        origin = f"the checkpoint's data order (num_streams={count})" if saved else f"data.num_streams={count}"
        fix = "" if saved else f", or set data.num_streams to a multiple of {dp_size} (0 picks one)"
        raise ConfigError(f"config: {origin} is not divisible by the {dp_size} data-parallel ranks; "
                          f"run on a data-parallel size that divides {count}{fix}")
    return count
