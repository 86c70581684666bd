"""Learning-rate schedules as a multiplier of the peak LR, driven by LambdaLR.

The paper trains with a trapezoid: linear warmup, constant plateau, linear cooldown to zero.
WSD is the same shape with a 1-sqrt cooldown; cosine is the classic baseline.

Endpoints: warmup's first step runs at 1/warmup of the peak and its last at the peak (no step at
lr 0, which transformers' warmup takes first); a decay starts at the peak and, as in transformers'
schedules, reaches the floor (0 x peak, or min_lr_ratio) at step `total_steps`, one past the last
update, which runs at floor + (1 - floor) / cooldown for the trapezoid. A cooldown of one step
(`cooldown_frac` x steps rounds to 1) therefore changes nothing.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import ScheduleSection


def lr_multiplier(step: int, total_steps: int, cfg: ScheduleSection) -> float:
    """Multiplier of the peak LR for the optimizer step with 0-based index `step`."""
    warmup = int(round(cfg.warmup_frac * total_steps))
    if step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.kind == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min((step - warmup) / span, 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    cooldown = int(round(cfg.cooldown_frac * total_steps))
    decay_start = total_steps - cooldown
    if step < decay_start or cooldown == 0:
        return 1.0
    progress = min((step - decay_start) / cooldown, 1.0)
    shape = progress if cfg.kind == "trapezoid" else math.sqrt(progress)  # wsd: 1 - sqrt
    return floor + (1 - floor) * (1 - shape)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleSection) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
