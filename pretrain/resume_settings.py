"""Settings a resumed run may change from its checkpoint's, and what it says when they do.

The data order (streams, seed, sources) is checked elsewhere and refused when it changes. Model
settings that keep every tensor's shape are refused unless a resume may change them
(`MAY_CHANGE_ON_RESUME`). The rest may legitimately change, but never silently: the global batch
(kept when the run left it to the layout, so a job restarted on fewer or more ranks trains on the
same batch), the LR schedule and its length, the sequence length, and the validation windows
(val/nll stays comparable only over the same windows).
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CONFIG_FILE, read_train_state
from pretrain.checkpoint_integrity import CheckpointDamaged
from pretrain.config import ConfigError, JobConfig, leaves


# Model settings a resumed run may change (warned): context extension (RoPE, max_seq_len), the SSD
# chunk (numerics only), the MoE balance terms, and initialisation settings, which do nothing once
# the weights exist. Any other difference is another model with the same tensor shapes.
MAY_CHANGE_ON_RESUME = ("max_seq_len", "rope", "swa_rope_theta", "chunk_size", "moe.bias_update_rate",
                        "moe.aux_loss_coef", "init_std", "a_init_range", "dt_min", "dt_max")


def model_setting_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The fields two `ModelConfig.to_dict()`s differ in, as 'model.overrides.KEY old -> new':
    (those a resumed run may not change, those it may)."""
    def plain(v: Any) -> Any:  # a JSON list and a dataclass tuple are one value
        return list(v) if isinstance(v, tuple) else v

    before, after = dict(leaves(old)), dict(leaves(new))
    refused, allowed = [], []
    for key in sorted(before.keys() | after.keys()):
        a, b = plain(before.get(key)), plain(after.get(key))
        if a != b:
            may = any(key == m or key.startswith(m + ".") for m in MAY_CHANGE_ON_RESUME)
            (allowed if may else refused).append(f"model.overrides.{key} {a!r} -> {b!r}")
    return refused, allowed


def read_saved_settings(path: Path) -> dict[str, Any]:
    """The checkpoint's config (its config.toml over the defaults: a key added since it was written
    has its default) as a dict, with `path` under 'path' and its data-parallel size (from its train
    state) under 'dp_size': all a resume compares, read before any model is built or loaded."""
    settings = dataclasses.asdict(JobConfig())
    try:
        for section, values in tomllib.loads((path / CONFIG_FILE).read_text()).items():
            if isinstance(settings.get(section), dict):
                settings[section].update(values)
        settings["dp_size"] = int(read_train_state(path)[0]["dp_size"])
    except CheckpointDamaged as e:
        raise ConfigError(f"config: {e}") from None
    except (OSError, TypeError, ValueError, AttributeError, KeyError) as e:
        raise ConfigError(f"config: cannot read the settings of {path} ({type(e).__name__}: {e}); resume from a "
                          "checkpoint that pretrain/main.py wrote") from None
    settings["path"] = str(path)
    return settings


def tokens_per_step(global_batch_tokens: int, micro_batch_size: int, seq_len: int, dp_size: int) -> int:
    """A step's tokens: the global batch, or (0) one micro-batch per data-parallel rank."""
    return global_batch_tokens or micro_batch_size * seq_len * dp_size


def _saved_tokens_per_step(saved: dict[str, Any]) -> int:
    t = saved["train"]
    return tokens_per_step(t["global_batch_tokens"], t["micro_batch_size"], saved["data"]["seq_len"], saved["dp_size"])


def keep_global_batch(cfg: JobConfig, dp_size: int, saved: dict[str, Any]) -> JobConfig:
    """`cfg` with train.global_batch_tokens = the checkpoint's batch when it is 0 (left to the
    layout) and this layout makes a step of another size; refused when accumulation cannot make the
    checkpoint's batch up. An explicit global batch is this run's (`changed_settings` warns)."""
    t = cfg.train
    per_micro = t.micro_batch_size * cfg.data.seq_len * dp_size
    kept = _saved_tokens_per_step(saved)
    if t.global_batch_tokens or kept == per_micro:
        return cfg
    if kept % per_micro:
        raise ConfigError(f"config: checkpoint {saved['path']} trained on {kept} tokens per step, which {dp_size} "
                          f"data-parallel ranks x train.micro_batch_size {t.micro_batch_size} x data.seq_len "
                          f"{cfg.data.seq_len} = {per_micro} tokens per micro-step cannot make up; keep it with "
                          f"train.global_batch_tokens={kept} and a train.micro_batch_size that divides it, or change "
                          f"the batch with train.global_batch_tokens={per_micro}")
    return dataclasses.replace(cfg, train=dataclasses.replace(t, global_batch_tokens=kept))


def changed_settings(cfg: JobConfig, dp_size: int, saved: dict[str, Any]) -> list[str]:
    """One warning per setting this resumed run changes from the checkpoint's: the batch, the
    sequence length, the schedule and its length, the validation windows."""
    t, old_t = cfg.train, saved["train"]
    changes = []
    new_tokens = tokens_per_step(t.global_batch_tokens, t.micro_batch_size, cfg.data.seq_len, dp_size)
    if new_tokens != (old_tokens := _saved_tokens_per_step(saved)):
        changes.append(f"tokens per step {old_tokens} -> {new_tokens} (train.global_batch_tokens): the optimizer "
                       "steps from here on see another batch")
    if cfg.data.seq_len != saved["data"]["seq_len"]:
        changes.append(f"data.seq_len {saved['data']['seq_len']} -> {cfg.data.seq_len}")
    if t.steps != old_t["steps"]:
        changes.append(f"train.steps {old_t['steps']} -> {t.steps}: the LR schedule follows the new length")
    for key, value in dataclasses.asdict(cfg.schedule).items():
        if saved["schedule"].get(key, value) != value:
            changes.append(f"schedule.{key} {saved['schedule'][key]!r} -> {value!r}")
    windows = t.val_batches * t.micro_batch_size * dp_size
    old_windows = old_t["val_batches"] * old_t["micro_batch_size"] * saved["dp_size"]
    if t.val_every > 0 and (windows, cfg.data.seq_len) != (old_windows, saved["data"]["seq_len"]):
        per_batch = t.micro_batch_size * dp_size
        keep = (f"; train.val_batches={old_windows // per_batch} keeps them"
                if old_windows % per_batch == 0 and cfg.data.seq_len == saved["data"]["seq_len"] else "")
        changes.append(f"validation windows {old_windows} -> {windows} (train.val_batches x train.micro_batch_size "
                       f"x {dp_size} data-parallel ranks, of data.seq_len tokens): val/nll is not comparable across "
                       f"this resume{keep}")
    return changes
