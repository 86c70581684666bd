"""What is evaluated: one checkpoint with its model, run config, data and tokenizer.

`--checkpoint` takes a step directory (any parallel layout: `pretrain.hf.load_model` reshards) or a
run directory (its newest checkpoint that verifies), so a sweep's run dirs can be passed as they are.
Every model loads on the CPU at start (a damaged checkpoint stops the evaluation before any suite
runs) and is on the evaluation device only while its own suites run (`Subject.on`), so a sweep's
checkpoints need the device memory of one.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pretrain.hf import CliError, load_model, read_run_config

TRAIN_STATE_FILE = "train_state.json"


@dataclass
class Subject:
    checkpoint: Path
    model: Any  # HybridLM
    run_config: dict[str, Any]
    label: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    seq_len: int | None = None  # overrides the run's training length for the suites

    @property
    def train_seq_len(self) -> int:
        """The length the model was trained at: what the long-context suites scale from."""
        seq_len = self.seq_len or self.run_config.get("data", {}).get("seq_len")
        if not seq_len:
            raise CliError(f"{self.checkpoint}: no config.toml with data.seq_len (a weights-only checkpoint?); "
                           "pass --seq-len TRAINING_LENGTH")
        return int(seq_len)

    @property
    def flops_seq_len(self) -> int:
        """The length its training FLOPs per token are counted at: the run's own where its config
        says (--seq-len only rescales the suites), else the suites' length."""
        return int(self.run_config.get("data", {}).get("seq_len") or self.train_seq_len)

    @contextlib.contextmanager
    def on(self, device: torch.device) -> Iterator[None]:
        """The model on `device` inside the block, back on the CPU after (its memory freed there)."""
        self.model.to(device)
        try:
            yield
        finally:
            self.model.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()

    @property
    def document_masking(self) -> bool:
        """Whether the run trained with data.document_masking (packed NLL is then scored the same way)."""
        return bool(self.run_config.get("data", {}).get("document_masking", False))

    def data_dir(self, override: str | None) -> Path:
        """The prepared dir to evaluate on: `override`, else the run's first data source."""
        if override:
            return Path(override)
        sources = self.run_config.get("data", {}).get("sources") or []
        if not sources:
            raise CliError(f"{self.checkpoint}: config.toml names no data.sources; pass --data PREPARED_DIR")
        from pretrain.config import parse_source

        return Path(parse_source(sources[0])[0])

    def checked_data_dir(self, override: str | None) -> Path:
        """`data_dir`, refused when its tokens are not this model's: prepared with another tokenizer
        than the run's own data (where that is readable), or holding ids the model does not embed."""
        from data_pipeline.errors import DataInputError
        from data_pipeline.manifest import read_manifest
        from pretrain.hf import recorded_tokenizer

        data = self.data_dir(override)
        flag = f"--data {data}" if override else f"{self.checkpoint}: data.sources[0] {data}"
        if not override and not data.is_absolute() and not data.exists():
            raise CliError(f"{flag}: no such directory here ({Path.cwd()}); a relative source is read from the "
                           "directory the training was launched from: run there, or pass --data PREPARED_DIR")
        try:
            tok = read_manifest(data).tokenizer
        except DataInputError as e:  # names the file, field and fix
            raise CliError(f"{flag}: {e}") from None
        sources = self.run_config.get("data", {}).get("sources") or []
        own = recorded_tokenizer(str(self.data_dir(None))) if override and sources else None
        if own is not None and (own.kind, own.sha256) != (tok.kind, tok.sha256):
            raise CliError(f"{flag}: prepared with another tokenizer ({tok.kind}, {tok.vocab_size} ids) than the run "
                           f"of {self.checkpoint} ({own.kind}, {own.vocab_size} ids); pass data prepared with the "
                           "run's tokenizer")
        if tok.vocab_size > self.model.config.vocab_size:
            raise CliError(f"{flag}: its tokenizer has {tok.vocab_size} ids but the model embeds "
                           f"{self.model.config.vocab_size}; pass data prepared with the model's tokenizer")
        return data


def resolve_checkpoint(path: Path) -> Path:
    """A step directory as given, or the newest verified checkpoint of a run directory."""
    from pretrain.checkpoint import MODEL_CONFIG_FILE, NoIntactCheckpoint, find_latest_complete

    if (path / MODEL_CONFIG_FILE).is_file():
        return path
    for ckpt_dir in (path / "checkpoints", path):
        if ckpt_dir.is_dir() and any(ckpt_dir.glob("step_*")):
            try:
                found = find_latest_complete(ckpt_dir)
            except NoIntactCheckpoint as e:
                raise CliError(f"{e}; or pass a step_* directory") from None
            if found is None:
                raise CliError(f"{ckpt_dir}: no checkpoint verifies; pass a step_* directory that does")
            return found
    raise CliError(f"{path}: neither a checkpoint (no {MODEL_CONFIG_FILE}) nor a run dir with checkpoints/step_*; "
                   "--checkpoint takes RUN_DIR or RUN_DIR/checkpoints/step_NNNNNNNN")


def load_subject(path: Path, seq_len: int | None = None) -> Subject:
    """The checkpoint at `path` (run or step dir), its model on the CPU."""
    ckpt = resolve_checkpoint(path)
    model = load_model(ckpt).eval()
    run_config = read_run_config(ckpt)
    from pretrain.accounting import count_params

    cfg = model.config
    state_file = ckpt / TRAIN_STATE_FILE
    progress = json.loads(state_file.read_text()).get("progress", {}) if state_file.is_file() else {}
    model_section = run_config.get("model", {})
    info = {"checkpoint": str(ckpt.resolve()), "arch": model_section.get("arch"), "size": model_section.get("size"),
            "pattern": cfg.pattern, "moe": cfg.moe is not None, "step": progress.get("step"),
            "tokens_seen": progress.get("tokens_seen"), **{f"{k}_params": v for k, v in count_params(cfg).items()}}
    return Subject(ckpt, model, run_config, info=info, seq_len=seq_len)


def run_name(checkpoint: Path) -> str:
    """The run a step_* checkpoint belongs to; else the directory's own name (an imported one)."""
    from pretrain.checkpoint import checkpoint_step

    checkpoint = checkpoint.resolve()
    return checkpoint.parent.parent.name if checkpoint_step(checkpoint) is not None else checkpoint.name


def unique_labels(archs: list[str | None], checkpoints: list[Path]) -> list[str]:
    """Labels for tables and legends (figures key their series by them): the arch, made unique
    with the run and step where needed, else the checkpoint's path."""
    base = [arch or run_name(c) for arch, c in zip(archs, checkpoints)]
    labels = [b if base.count(b) == 1 else f"{b} ({run_name(c)}/{c.name})" for b, c in zip(base, checkpoints)]
    return [label if labels.count(label) == 1 else str(c) for label, c in zip(labels, checkpoints)]


def label_subjects(subjects: list[Subject]) -> None:
    for s, label in zip(subjects, unique_labels([s.info["arch"] for s in subjects], [s.checkpoint for s in subjects])):
        s.label = label
