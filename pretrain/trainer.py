"""The training loop: data-parallel (FSDP2) AdamW training with exact resume.

Everything a step depends on (parameters, optimizer moments, LR schedule position, data-loader
position, every rank's RNG) is in the checkpoint, so a run resumed at step s computes bit for bit
what the uninterrupted run computed after step s (on CPU; on GPU up to kernel nondeterminism).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict, set_model_state_dict,
                                                     set_state_dict)

from parallel.context_parallel import shard_index
from parallel.distributed import DistInfo, all_reduce_scalar, all_reduce_sum_, barrier, init_distributed
from parallel.float8 import float8_unavailable, precompute_float8_scales
from parallel.grad_norm import clip_coefficient, clip_grad_norm_, grad_norm
from parallel.init import init_sharded
from parallel.mesh import build_mesh
from parallel.mixed_precision import WorkingCopies
from parallel.pipeline import Pipeline, build_pipeline, local_stage_ids
from pretrain.checkpoint import (CONFIG_FILE, MODEL_CONFIG_FILE, CheckpointManager, CheckpointSaveFailed,
                                 load_model_weights, model_config_json, origin_key, read_train_state, WeightsDoNotFit)
from pretrain.config import ConfigError, JobConfig, parse_source, to_toml, unused_settings
from pretrain.determinism import capture_rng_state, fingerprint_changes, restore_rng_state, runtime_fingerprint
from pretrain.job import (build_model_from_config, check_document_masking, grad_accum_steps, parallel_dims,
                          pipeline_plan, resolve_num_streams, wrap_options)
from pretrain.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch
from pretrain.rank_agreement import agreed_config_errors, rank0_decides
from pretrain.resume_settings import (changed_settings, keep_global_batch, model_setting_changes,
                                     read_saved_settings, tokens_per_step)
from pretrain.metrics import MetricsLogger, memory_gib, moe_balance_scalars
from pretrain.model.config import ModelConfig
from pretrain.model.legacy import legacy_splits
from pretrain.model.moe import MoE
from pretrain.model.packed import PackedDocs, without_unneeded_starts
from pretrain.model.parallelize import parallelize_hybrid, pipeline_model
from pretrain.model.ops.ssd import reference_scan_warning
from pretrain.optim import AdamWWithCopies, initialise_state, keep_implementation_on_load
from pretrain.resume_choice import choose_resume_checkpoint, set_aside_stale
from pretrain.schedule import build_scheduler
from pretrain.summary import SUMMARY_FILE, finite_or_null, write_summary

log = logging.getLogger("pretrain")

# Exit codes the launchers act on (documented in docs/training.md); 75 is EXIT_PREEMPTED.
EXIT_STOPPED = 3  # stopped by a guard (repeated non-finite steps); needs a human, do not requeue


class TrainingStopped(RuntimeError):
    """A guard stopped the run; the message names the step and the last good checkpoint."""


@dataclass
class TrainProgress:
    """Counters that survive resume (part of the checkpoint)."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps_total: int = 0
    bad_steps_consecutive: int = 0
    wall_time_s: float = 0.0  # summed over all segments of the run
    last_train_loss: float = float("nan")
    last_val_nll: float = float("nan")


# param-group keys a resume may find changed, as the config names them
OPTIM_FIELDS = {"initial_lr": "optim.lr", "betas": "optim.beta1/beta2", "eps": "optim.eps",
                "weight_decay": "optim.weight_decay"}


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Build everything from a JobConfig, then `train()`. One instance per process."""

    def __init__(self, cfg: JobConfig, dist_info: DistInfo | None = None,
                 preemption: PreemptionWatch | None = None):
        self.cfg = cfg
        self.preemption = preemption or PreemptionWatch()
        self.run_dir = Path(cfg.run_dir)
        device_type = None if cfg.train.device == "auto" else cfg.train.device
        self.dist = dist_info or init_distributed(device_type)
        self.device = self.dist.device
        self.is_main = self.dist.is_main
        self.wall_start = time.perf_counter()
        if not cfg.data.sources:
            raise ConfigError("config: data.sources is empty; pass --data DIR (a prepared data directory)")
        from data_pipeline.documents import load_sources
        from data_pipeline.errors import DataInputError

        self.sources = [parse_source(s) for s in cfg.data.sources]

        def check_sources() -> None:  # every manifest, tokenizer and shard set, before any model is built
            try:
                load_sources(self.sources)
            except DataInputError as e:
                raise ConfigError(f"config: data.sources: {e}") from None

        rank0_decides(check_sources, self.is_main)

        self.dims = parallel_dims(cfg, self.dist.world_size)
        self.mesh = build_mesh(self.dims, self.device.type)
        self.dp_rank, self.dp_size = self.mesh.dp_coordinate() if self.mesh else (0, 1)
        self._stale: dict[str, list[Path]] = {}  # set aside once the resume has loaded
        self._resume_path = choose_resume_checkpoint(self.run_dir / "checkpoints", cfg.checkpoint.resume_from,
                                                     self._stale)
        path = self._resume_path
        saved = rank0_decides(lambda: read_saved_settings(path), self.is_main) if path is not None else None
        num_streams = resolve_num_streams(cfg.data.num_streams, self.dp_size,
                                          int(saved["data"]["num_streams"]) if saved else None)
        check_document_masking(cfg, saved)
        self._set_batch(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_streams=num_streams)))
        if saved is not None:  # before any model is built: a refusal costs no checkpoint load
            self._check_settings(saved)
        cfg = self.cfg

        dtype = cfg.train.dtype
        if dtype == "auto":
            dtype = "bf16" if self.device.type == "cuda" else "fp32"
        self.compute_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32

        fp8_problem = float8_unavailable(cfg.train.fp8, self.device)
        if fp8_problem:
            raise ConfigError(f"config: {fp8_problem}")

        _seed_everything(cfg.train.seed)
        # Built and wrapped on meta, then materialised one module at a time on the device: no
        # rank ever holds the whole model, and the initial weights are those of an unsharded
        # model on that device whatever the number of ranks.
        self.model = build_model_from_config(cfg, device="meta")
        template = copy.deepcopy(self.model)  # unsharded, unwrapped: init_sharded's full modules
        self.model_config = self.model.config
        if self.is_main and (missing := reference_scan_warning(self.device, self.model_config.blocks)):
            log.warning("%s", missing)
        if path is not None:
            self._check_model_settings(path)
        self.pipeline: Pipeline | None = None
        wrap = wrap_options(cfg, self.compute_dtype)
        with agreed_config_errors():
            if self.dims.pp > 1:
                self.model, self.pipeline = self._build_pipeline(wrap)
            else:
                parallelize_hybrid(self.model, self.mesh, **wrap)
        init_sharded(self.model, template, self.device)
        self.moe_layers = list(self.model.moe_layers())
        # one process computing in bf16: persistent bf16 working copies (FSDP casts when it gathers)
        self.copies = (WorkingCopies(self.model, self.compute_dtype)
                       if self.mesh is None and self.compute_dtype != torch.float32 else None)
        self.optimizer = self._build_optimizer()
        self.scheduler = build_scheduler(self.optimizer, cfg.train.steps, cfg.schedule)
        # this run's optimizer settings (lr as the schedule's base): a resume restores them over the checkpoint's
        self._hyperparameters = [{k: v for k, v in g.items() if k not in ("params", "lr")}
                                 for g in self.optimizer.param_groups]

        from data_pipeline.loader import build_train_loader

        self.train_loader = build_train_loader(
            self.sources, cfg.data.seq_len, cfg.train.micro_batch_size, dp_rank=self.dp_rank,
            dp_size=self.dp_size, seed=cfg.train.seed, num_workers=cfg.data.num_workers,
            num_streams=cfg.data.num_streams, emit_doc_boundaries=cfg.data.document_masking)
        if path is not None:  # the data order is checked here, before the checkpoint's tensors load
            self._load_loader_state(read_train_state(path)[1])
        self._train_iter = None

        from pretrain.accounting import flops_per_token

        # MFU counts the LM head too ("total"); the paper's FLOPs column leaves it out.
        self.flops_per_token = float(flops_per_token(self.model_config, cfg.data.seq_len)["total"])
        peak_total = cfg.logging.peak_tflops * 1e12 * self.dist.world_size
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLogger(self.run_dir, self.is_main, cfg.logging.tensorboard,
                                     self.flops_per_token, peak_total, cfg.train.steps)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", cfg.checkpoint.keep,
                                      cfg.checkpoint.async_save, self.is_main)
        self.progress = TrainProgress()
        self._resumed_from: Path | None = None
        self._origin: str | None = None  # the --resume-from checkpoint this trajectory started from
        self._moe_load: list[torch.Tensor] = []
        self._ep_rank_rows: tuple[float, float] | None = None  # see _ep_rank_rows_max_and_mean

    # ---- set-up helpers -------------------------------------------------------------------
    def _build_pipeline(self, wrap: dict[str, Any]) -> tuple[nn.Module, Pipeline]:
        """This rank's stages, built on meta with only their blocks and wrapped like a whole model;
        `self.model` becomes the module holding them all (global parameter names)."""
        cfg = self.cfg
        stages, per_rank = pipeline_plan(cfg, self.model_config)
        pp_mesh = self.mesh.pp_mesh()
        ids = local_stage_ids(cfg.parallel.pp_schedule, pp_mesh.get_local_rank(), self.dims.pp, per_rank)
        model = pipeline_model(self.model_config, stages, ids)
        model, modules = parallelize_hybrid(model, self.mesh, stages=stages, stage_ids=ids, **wrap)
        pipeline = build_pipeline(modules, ids, len(stages), cfg.parallel.pp_schedule,
                                  cfg.parallel.pp_microbatches or self.dims.pp, pp_mesh.get_group(), self.device)
        if self.is_main:
            log.info("pipeline: %d stages %s, %s, %d microbatches", len(stages), stages, cfg.parallel.pp_schedule,
                     pipeline.microbatches)
        return model, pipeline

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW; matrices decay, vectors (norms, biases, gains) do not. With working copies, the
        AdamW that reads their gradients and rewrites them in the same pass."""
        o = self.cfg.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.ndim >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        options = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
        if self.copies is not None:
            optimizer = AdamWWithCopies(groups, self.copies, **options)
        else:
            optimizer = torch.optim.AdamW(groups, **options, fused=self.device.type == "cuda")
            keep_implementation_on_load(optimizer)  # fused or not as built here, whatever saved the checkpoint
        initialise_state(optimizer)  # a save before the first good step holds step 0, not torch's lr-0 step
        return optimizer

    def _precision(self) -> contextlib.AbstractContextManager:
        """FSDP's MixedPrecisionPolicy casts parameters itself; one process computes with its
        working copies likewise (not autocast's casts per op). Hold it over forward and backward."""
        return self.copies.swapped() if self.copies is not None else contextlib.nullcontext()

    # ---- checkpoint state ---------------------------------------------------------------------
    def _dcp_state(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest committed checkpoint (saved by this run segment, else the one it resumed
        from). An async save in flight is not one yet: it appears here once `ckpt.poll()` commits it."""
        return self.ckpt.committed or self._resumed_from

    def save_checkpoint(self) -> None:
        """Save (async: start saving) a checkpoint of the current step; see `last_checkpoint`."""
        if not self.cfg.checkpoint.enabled:
            return
        p = self.progress
        p.wall_time_s += time.perf_counter() - self.wall_start
        self.wall_start = time.perf_counter()
        shared = {"progress": finite_or_null(dataclasses.asdict(p)), "scheduler": self.scheduler.state_dict(),
                  "world_size": self.dist.world_size, "dp_size": self.dp_size, "runtime": runtime_fingerprint(),
                  "origin": self._origin}
        rank_state = {"rng": capture_rng_state(), "loader": self.train_loader.state_dict(), "dp_rank": self.dp_rank}
        texts = {CONFIG_FILE: to_toml(self.cfg), MODEL_CONFIG_FILE: model_config_json(self.model_config)}
        self.ckpt.save(p.step, self._dcp_state(), rank_state, shared, texts)

    def resume(self) -> bool:
        """Load the requested or newest complete checkpoint; False when starting fresh."""
        path = self._resume_path
        if path is None:
            if self.cfg.checkpoint.init_from:
                self._init_from(Path(self.cfg.checkpoint.init_from))
            return False
        state = self._dcp_state()
        try:
            shared, ranks = self.ckpt.load(path, state, legacy_splits(self.model_config))
        except WeightsDoNotFit as e:  # tensors its model_config.json did not announce (written by other code)
            raise ConfigError(f"config: {e}") from None
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._sync_copies()
        self.scheduler.load_state_dict(shared["scheduler"])
        self._restore_hyperparameters()
        self.progress = TrainProgress(**{k: math.nan if v is None else v for k, v in shared["progress"].items()})
        mine = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        restore_rng_state(mine["rng"])
        self._resumed_from = path
        requested = self.cfg.checkpoint.resume_from
        taken = bool(requested) and origin_key(path) == origin_key(requested)
        self._origin = origin_key(path) if taken else shared.get("origin")
        set_aside_stale(self.run_dir / "checkpoints", self._stale, self.is_main)
        log.info("resumed from %s at step %d (saved by %d rank(s), now %d)",
                 path, self.progress.step, len(ranks), self.dist.world_size)
        changes = fingerprint_changes(shared["runtime"])
        if changes and self.is_main:
            log.warning("resuming under a different runtime (%s): the run continues correctly but not bit for bit "
                        "as it would have uninterrupted; see docs/training.md (exact resume)", "; ".join(changes))
        return True

    def _set_batch(self, cfg: JobConfig) -> None:
        """Take `cfg` and the accumulation and tokens of its optimizer step."""
        t = cfg.train
        self.cfg, self.grad_accum = cfg, grad_accum_steps(cfg, self.dp_size)
        self.tokens_per_step = tokens_per_step(t.global_batch_tokens, t.micro_batch_size, cfg.data.seq_len,
                                               self.dp_size)

    def _check_settings(self, saved: dict[str, Any]) -> None:
        """Keep the checkpoint's global batch where this run left it to the layout; warn of every
        setting changed from the checkpoint's (pretrain/resume_settings.py)."""
        kept = keep_global_batch(self.cfg, self.dp_size, saved)
        if kept is not self.cfg:
            self._set_batch(kept)
            if self.is_main:
                log.info("keeping the checkpoint's %d tokens per step (train.global_batch_tokens=0 on another "
                         "layout): %d accumulation steps", self.tokens_per_step, self.grad_accum)
        if self.is_main:
            for change in changed_settings(self.cfg, self.dp_size, saved):
                log.warning("resumed with a changed setting: %s", change)

    def _check_model_settings(self, path: Path) -> None:
        """Refuse a model whose settings differ from the checkpoint's, at start (another fusion,
        top-k or window keeps every tensor's shape: it would train on silently); warn of those a
        resumed run may change (`MAY_CHANGE_ON_RESUME`). Rank 0 reads the file and decides for
        every rank."""
        def compare() -> list[str]:
            saved = path / MODEL_CONFIG_FILE
            try:  # through ModelConfig: a field added since the checkpoint was written has its default
                old = ModelConfig.from_saved(json.loads(saved.read_text())).to_dict()
            except (OSError, ValueError, TypeError) as e:
                raise ConfigError(f"config: cannot read {saved} ({type(e).__name__}: {e}); resume from another "
                                  "checkpoint") from None
            refused, allowed = model_setting_changes(old, self.model_config.to_dict())
            if old.get("vocab_size") != self.model_config.vocab_size:  # read off the data: no override fixes it
                raise ConfigError(f"config: {path} was trained on data of a {old.get('vocab_size')}-id tokenizer, but "
                                  f"data.sources {self.cfg.data.sources} is tokenized with {self.model_config.vocab_size} "
                                  f"ids: other data than the run's; resume with the data of {path / CONFIG_FILE}, or "
                                  "train on this data in a new run directory")
            if refused:
                raise ConfigError(f"config: {path} was trained with other model settings ({'; '.join(refused[:3])}"
                                  f"{f'; {len(refused) - 3} more' if len(refused) > 3 else ''}); resume with the "
                                  f"checkpoint's --arch/--size/model.overrides (its {MODEL_CONFIG_FILE}), or (tensors of "
                                  "the same shapes) start a new run from its weights with --checkpoint.init_from")
            return allowed

        allowed = rank0_decides(compare, self.is_main)
        if allowed and self.is_main:
            log.warning("resumed with model settings other than the checkpoint's: %s", "; ".join(allowed))

    def _restore_hyperparameters(self) -> None:
        """The optimizer's settings and the LR schedule are this run's, not the checkpoint's (which
        the optimizer's and scheduler's state dicts bring back): a resumed run may change optim.* or
        extend train.steps, and the step after resume runs at this schedule's LR for that step (the
        same value, bit for bit, when nothing changed)."""
        groups, step = self.optimizer.param_groups, self.scheduler.last_epoch
        changes = sorted({f"{OPTIM_FIELDS[k]} {g.get(k)} -> {v}" for g, mine in zip(groups, self._hyperparameters)
                          for k, v in mine.items() if k in OPTIM_FIELDS and _plain(g.get(k)) != _plain(v)})
        if changes and self.is_main:
            log.warning("resumed with optimizer settings other than the checkpoint's: %s; this run's apply from "
                        "step %d", "; ".join(changes), step + 1)
        for g, mine in zip(groups, self._hyperparameters):
            g.update(mine)
        self.scheduler.base_lrs = [g["initial_lr"] for g in groups]
        for g, base, multiplier in zip(groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            g["lr"] = base * multiplier(step)
        self.scheduler._last_lr = [g["lr"] for g in groups]

    def _init_from(self, path: Path) -> None:
        """Start a fresh run (new optimizer, step 0) from another checkpoint's model weights; the
        model settings that differ from the checkpoint's (a longer window, another RoPE base: the
        shapes agree) are listed in a warning."""
        model_sd = get_model_state_dict(self.model)
        try:
            load_model_weights(path, model_sd, legacy_splits(self.model_config), self.cfg.checkpoint.init_from_partial)
        except ValueError as e:
            fix = "" if self.cfg.checkpoint.init_from_partial else \
                " (to load only the tensors this model has, set checkpoint.init_from_partial=true)"
            raise ConfigError(f"config: checkpoint.init_from: {e}{fix}") from None
        set_model_state_dict(self.model, model_sd)
        self._sync_copies()
        log.info("initialised model weights from %s", path)
        if self.is_main and (path / MODEL_CONFIG_FILE).is_file():
            old = ModelConfig.from_saved(json.loads((path / MODEL_CONFIG_FILE).read_text())).to_dict()
            changes = [c for part in model_setting_changes(old, self.model_config.to_dict()) for c in part]
            if changes:
                log.warning("model settings other than those of %s: %s", path, "; ".join(changes))

    def _sync_copies(self) -> None:
        if self.copies is not None:
            self.copies.sync()

    def _load_loader_state(self, ranks: list[dict[str, Any]]) -> None:
        """The loader keeps its state per canonical stream and takes every old rank's state, so
        this works for any change of dp_size (streams are reassigned to the new ranks)."""
        from data_pipeline.errors import DataInputError

        try:
            self.train_loader.load_state_dict([r["loader"] for r in ranks])
        except DataInputError as e:
            if e.field.startswith("data.sources["):  # other data at the checkpoint's path: names its own fix
                raise ConfigError(f"config: {e}") from None
            key = {"seed": "train.seed", "sources": "data.sources", "num_streams": "data.num_streams"}.get(e.field)
            if key is None:
                raise
            raise ConfigError(f"config: {key} is not the resumed checkpoint's ({e.problem}): the data order would "
                              f"change; resume with the checkpoint's {key} (its config.toml), or train this "
                              "in a new run directory") from None

    # ---- signals ----------------------------------------------------------------------------
    def _stop_requested(self) -> bool:
        """All ranks agree, so they all save and exit at the same step."""
        requested = 1.0 if self.preemption.requested else 0.0
        return all_reduce_scalar(requested, "max", self._reduce_device()) > 0

    def _reduce_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ---- the loop -----------------------------------------------------------------------------
    def _next_batch(self) -> dict[str, torch.Tensor]:
        """tokens [b, L+1] (+ doc_starts under data.document_masking, when the batch needs the mask)
        on the device."""
        if self._train_iter is None:
            self._train_iter = iter(self.train_loader)
        return {k: v.to(self.device, non_blocking=True) for k, v in without_unneeded_starts(next(self._train_iter)).items()}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; skipped when loss or grad is non-finite."""
        self.model.train()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        for _ in range(self.grad_accum):
            batch = self._next_batch()
            if self.pipeline is not None:
                loss = self._pipeline_loss(batch["tokens"], batch.get("doc_starts"), train=True)
            else:
                with self._precision():
                    loss = self._loss(batch["tokens"], batch.get("doc_starts"))
                    (loss / self.grad_accum).backward()
                if self.copies is not None and self.grad_accum > 1:
                    self.copies.accumulate()  # in fp32, as through a cast
            loss_sum += loss.detach().float()
        loss_val = self._dp_mean(float(loss_sum) / self.grad_accum)
        grad_norm_val, grad_scale = self._clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        p = self.progress
        if math.isfinite(loss_val) and math.isfinite(grad_norm_val):
            if self.copies is not None:
                self.optimizer.step(grad_scale=grad_scale)
            else:
                self.optimizer.step()
            if self.mesh is not None:
                precompute_float8_scales(self.model, self.cfg.train.fp8)
            self._update_moe_bias()
            p.bad_steps_consecutive = 0
            p.last_train_loss = loss_val
        else:
            for layer in self.moe_layers:  # a skipped step's routing must not steer the next bias update
                layer.discard_load()
            self._moe_load, self._ep_rank_rows = [], None  # nor be logged as this step's (the last good one's)
            p.bad_steps_total += 1
            p.bad_steps_consecutive += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row, %d total)",
                        p.step + 1, loss_val, grad_norm_val, p.bad_steps_consecutive, p.bad_steps_total)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        p.step += 1
        p.tokens_seen += self.tokens_per_step
        return {"train/loss": loss_val, "train/lr": lr, "train/grad_norm": grad_norm_val}

    def _loss(self, tokens: torch.Tensor, doc_starts: torch.Tensor | None = None) -> torch.Tensor:
        """The model's loss on a [b, L+1] window batch; under context parallelism on this rank's
        (load-balanced) shard of the sequence, with its positions. `doc_starts` [b, L+1]: the
        windows' document starts, for document masking (positions then restart per document)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        docs = PackedDocs.from_starts(doc_starts[:, :-1]) if doc_starts is not None else None
        cp_mesh = self.mesh.cp_mesh() if self.mesh is not None else None
        if cp_mesh is None:  # masking off: the call as without document masking
            return self.model.loss(inputs, targets) if docs is None else self.model.loss(inputs, targets, docs)
        positions = shard_index(inputs.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), inputs.device)
        return self.model.loss(inputs[:, positions], targets[:, positions],
                               positions if docs is None else docs.select(positions))

    def _pipeline_loss(self, tokens: torch.Tensor, doc_starts: torch.Tensor | None, train: bool) -> torch.Tensor:
        """One batch through the pipeline (forward and backward when `train`): the inputs feed the
        first stage, the targets and positions (CP's, one row per sample; under document masking
        PackedDocs as its positions and document index, which every stage's mixers need) every
        stage. Returns the batch's mean loss on every pipeline rank (summed over the stages)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        cp_mesh = self.mesh.cp_mesh()
        if cp_mesh is None:
            index = torch.arange(inputs.shape[1], device=inputs.device)
        else:
            index = shard_index(inputs.shape[1], cp_mesh.size(), cp_mesh.get_local_rank(), inputs.device)
            inputs, targets = inputs[:, index], targets[:, index]
        if doc_starts is None:
            kwargs = {"positions": index.expand(inputs.shape[0], -1)}
        else:
            docs = PackedDocs.from_starts(doc_starts[:, :-1]).select(index)
            kwargs = {"positions": docs.positions, "doc": docs.doc}
        loss = self.pipeline.run(inputs, targets, train, self.grad_accum, **kwargs)
        shared = loss if loss is not None else torch.zeros((), device=self.device)
        return all_reduce_sum_(shared.float().reshape(1), self.mesh.pp_mesh().get_group())[0]

    def _dp_mean(self, value: float) -> float:
        """Mean over the ranks that saw different tokens (dp x cp; tp peers hold the same value)."""
        if self.mesh is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._reduce_device())
        return float(all_reduce_sum_(t, self.mesh.tokens_group())) / self.mesh.dp_cp.size()

    def _clip_gradients(self) -> tuple[float, float]:
        """The gradients' global norm before clipping to optim.grad_clip, and the scale still to
        apply: working copies' gradients are scaled by the optimizer as it reads them, the others
        here in place (scale 1 left)."""
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        pp_group = self.mesh.pp_mesh().get_group() if self.pipeline is not None else None
        if self.copies is None:
            return float(clip_grad_norm_(self.model.parameters(), max_norm, pp_group)), 1.0
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        total = grad_norm([g for p in params if (g := self.copies.grad(p)) is not None], pp_group)
        return float(total), clip_coefficient(total, max_norm)

    @torch.no_grad()
    def _update_moe_bias(self) -> None:
        """Aux-loss-free balancing on the expert loads of the whole global batch: every layer's
        token counts, summed over the data-parallel group in one all-reduce, so every rank applies
        the same bias update (pp peers saw the same tokens and are not summed over; CP and TP ranks
        each routed a part of the sequence and are)."""
        if not self.moe_layers:
            return
        counts = [layer.tokens_per_expert for layer in self.moe_layers]
        total = all_reduce_sum_(torch.cat(counts), self.mesh.tokens_group() if self.mesh is not None else None)
        tp_mesh = self.mesh.tp_mesh() if self.mesh is not None else None
        if tp_mesh is not None:  # each TP rank routed its own part of the sequence
            all_reduce_sum_(total, tp_mesh.get_group())
        self._moe_load = list(total.split([c.numel() for c in counts]))
        if self.dims.ep > 1:
            self._ep_rank_rows = self._ep_rank_rows_max_and_mean()
        for layer, load in zip(self.moe_layers, self._moe_load):
            layer.update_bias(load)

    def _ep_rank_rows_max_and_mean(self) -> tuple[float, float]:
        """Under expert parallelism: the most rows any rank's experts computed in this step (the
        capacity a fixed buffer would need; nothing is dropped) and the mean over ranks, for the
        worst layer."""
        received = torch.stack([layer.tokens_received for layer in self.moe_layers]).double()
        most = received.clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        mean = all_reduce_sum_(received, None) / self.dist.world_size
        worst = int(torch.argmax(most / mean.clamp(min=1)))
        return float(most[worst]), float(mean[worst])

    def _all_stages_moe_load(self) -> list[torch.Tensor]:
        """Every MoE layer's last load in layer order; under pipeline parallelism gathered from the
        ranks holding the other stages (each updates only its own layers' bias)."""
        if self.pipeline is None:
            return self._moe_load
        ids = [int(key) for key, block in self.model.blocks.items() for m in block.modules() if isinstance(m, MoE)]
        group = self.mesh.pp_mesh().get_group()
        stages: list[Any] = [None] * torch.distributed.get_world_size(group)
        torch.distributed.all_gather_object(stages, list(zip(ids, [t.cpu() for t in self._moe_load])), group=group)
        return [load for _, load in sorted((pair for stage in stages for pair in stage), key=lambda pair: pair[0])]

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean NLL per token over the validation split (same number of batches on every rank)."""
        from data_pipeline.loader import build_val_loader

        self.model.eval()
        batches = list(build_val_loader(self.sources, self.cfg.data.seq_len, self.cfg.train.micro_batch_size,
                                        dp_rank=self.dp_rank, dp_size=self.dp_size,
                                        max_batches=self.cfg.train.val_batches,
                                        emit_doc_boundaries=self.cfg.data.document_masking))
        n = int(all_reduce_scalar(float(len(batches)), "min", self._reduce_device()))
        total, count = 0.0, 0
        for batch in batches[:n]:
            batch = {k: v.to(self.device) for k, v in without_unneeded_starts(batch).items()}
            tokens, doc_starts = batch["tokens"], batch.get("doc_starts")
            if self.pipeline is not None:
                loss = self._pipeline_loss(tokens, doc_starts, train=False)
            else:
                with self._precision():
                    loss = self._loss(tokens, doc_starts)
            numel = tokens[:, 1:].numel() // self.dims.cp  # this rank's share of the targets
            total += float(loss) * numel
            count += numel
        self.model.train()
        total = all_reduce_scalar(total, "sum", self._reduce_device())
        count = all_reduce_scalar(float(count), "sum", self._reduce_device())
        if count == 0:
            log.warning("validation split is empty; no validation NLL")
            return float("nan")
        return total / count

    def _should(self, every: int) -> bool:
        return every > 0 and self.progress.step % every == 0

    def train(self) -> dict[str, Any]:
        """Run to train.steps; returns the summary (also written to RUN_DIR/summary.json)."""
        self.preemption.install()
        self.preemption.start_up()
        resumed = self.resume()
        cfg = self.cfg  # after resume: it may keep the checkpoint's global batch
        if resumed and self.progress.step >= cfg.train.steps:
            log.info("already finished at step %d (train.steps=%d): nothing to do; raise train.steps to train on",
                     self.progress.step, cfg.train.steps)
            self.preemption.training()
            self.metrics.close()
            return self._summary("finished", None)
        # metrics of this run directory's steps up to a checkpoint of its own stand; from a checkpoint
        # elsewhere (or none), the trajectory logged here is another's
        own = resumed and self._resumed_from.resolve().parent == (self.run_dir / "checkpoints").resolve()
        self.metrics.open(self.progress.step if own else -1)
        self.preemption.training()
        if self.is_main:
            log.info("resolved config:\n%s", to_toml(cfg))
            log.info("model %s/%s pattern %s | %s | dp=%d tp=%d cp=%d ep=%d pp=%d grad_accum=%d tokens/step=%d | "
                     "%.3g FLOPs/token", cfg.model.arch, cfg.model.size, getattr(self.model_config, "pattern", "?"),
                     self.device, self.dp_size, self.dims.tp, self.dims.cp, self.dims.ep, self.dims.pp, self.grad_accum,
                     self.tokens_per_step, self.flops_per_token)
            for unused in unused_settings(cfg, self.model_config.blocks):
                log.warning("%s", unused)
        status, error = "finished", None
        try:
            if not resumed and cfg.train.val_every > 0:
                self._validate()
            self.metrics.reset_window()
            while self.progress.step < cfg.train.steps:
                scalars = self.train_step()
                tps, mfu = self.metrics.throughput(self.tokens_per_step)
                with self.metrics.untimed():
                    self.ckpt.poll()  # commit an async save as soon as every rank has written it
                p = self.progress
                stopping = p.bad_steps_consecutive >= cfg.train.max_bad_steps
                if self._should(cfg.logging.log_every) or p.step == cfg.train.steps or stopping:
                    scalars.update(self._periodic_scalars(tps, mfu))
                    self.metrics.log(p.step, scalars)
                    self.metrics.reset_window()
                if stopping:
                    self.ckpt.wait()  # every rank is here: finish the last good save, then name it
                    last = self.last_checkpoint or "none (no checkpoint saved yet)"
                    raise TrainingStopped(
                        f"stopped at step {p.step}: {p.bad_steps_consecutive} consecutive steps with non-finite "
                        f"loss or gradients (train.max_bad_steps={cfg.train.max_bad_steps}); last good "
                        f"checkpoint: {last}")
                if self._should(cfg.train.val_every) or (p.step == cfg.train.steps and cfg.train.val_every > 0):
                    with self.metrics.untimed():
                        self._validate()
                # A signal during the last step needs no requeue: the run is finishing anyway.
                if p.step < cfg.train.steps and self._stop_requested():
                    signal = f"signal {self.preemption.signum} at step {p.step}"
                    try:
                        self.save_checkpoint()
                        self.ckpt.wait()
                    except CheckpointSaveFailed as e:  # still preempted: the requeued run resumes from an older one
                        raise Preempted(f"{signal}; {e}") from None
                    raise Preempted(signal)
                # Mid-streak saves would only repeat the last good state under a newer name.
                periodic = self._should(cfg.checkpoint.every) and p.bad_steps_consecutive == 0
                if periodic or p.step == cfg.train.steps:
                    with self.metrics.untimed():
                        self.save_checkpoint()
            self.ckpt.wait()
        except Preempted as e:
            status, error = "preempted", str(e)
            log.warning("preempted (%s); checkpoint %s; exit code %d asks the launcher to requeue",
                        e, self.last_checkpoint, EXIT_PREEMPTED)
            raise
        except TrainingStopped as e:
            status, error = "stopped", str(e)
            log.error("%s", e)
            raise
        except BaseException as e:
            status, error = "failed", f"{type(e).__name__}: {e}"
            raise
        finally:
            summary = self._summary(status, error)
            if status == "preempted":
                # Every rank got here together; none exits (75) before rank 0 has written summary.json,
                # which the launchers read (srun --kill-on-bad-exit kills the rest at the first exit).
                barrier()
            self.metrics.close()
        return summary

    def _validate(self) -> None:
        nll = self.evaluate()
        self.progress.last_val_nll = nll
        self.metrics.log(self.progress.step, {"val/nll": nll}, progress=False)
        if self.is_main:
            log.info("step %d | validation NLL %.4f", self.progress.step, nll)

    def _periodic_scalars(self, tps: float, mfu: float) -> dict[str, float]:
        out = {"perf/tokens_per_s": tps, "perf/mfu": mfu, "perf/memory_gib": memory_gib(self.device),
               "train/tokens_seen": float(self.progress.tokens_seen),
               "train/bad_steps": float(self.progress.bad_steps_total)}
        out.update(moe_balance_scalars(self._all_stages_moe_load()))
        if self._ep_rank_rows is not None:
            most, mean = self._ep_rank_rows
            out.update({"moe/ep_rank_rows_max": most, "moe/ep_rank_rows_max_over_mean": most / max(mean, 1.0)})
        for k, v in self.train_loader.metrics().items():
            # Skip counters are per rank (its own streams): sum them; proportions stay rank 0's.
            total = all_reduce_scalar(float(v), "sum", self._reduce_device()) if k.startswith("skipped/") else v
            out[f"data/{k}"] = float(total)
        return out

    def _summary(self, status: str, error: str | None) -> dict[str, Any]:
        p = self.progress
        summary = {
            "status": status,
            "exit_code": {"finished": 0, "preempted": EXIT_PREEMPTED, "stopped": EXIT_STOPPED}.get(status, 1),
            "error": error,
            "step": p.step,
            "total_steps": self.cfg.train.steps,
            "tokens_seen": p.tokens_seen,
            "last_train_loss": p.last_train_loss,
            "last_val_nll": p.last_val_nll,
            "bad_steps": p.bad_steps_total,
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "wall_time_s": time.perf_counter() - self.wall_start + p.wall_time_s,
            "world_size": self.dist.world_size,
            "arch": self.cfg.model.arch,
            "size": self.cfg.model.size,
            "run_dir": str(self.run_dir),
        }
        if self.is_main:
            try:
                write_summary(self.run_dir, summary)
            except OSError as e:
                if status == "finished":
                    raise
                log.error("could not write %s (%s: %s)", self.run_dir / SUMMARY_FILE, type(e).__name__, e)
        return summary
