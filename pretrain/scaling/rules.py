"""The per-size hyperparameter rules of a scaling grid, kept apart so they can be read and changed.

Learning rate: the paper's peak LRs per size (PAPER: 6e-3 at 100M, 3e-3 at 350M, 6e-4 at 1B,
3e-4 at 3B, for 0.10B / 0.35B / 0.97B / 2.78B non-embedding parameters) interpolated linearly in
log(lr) against log(parameters), held constant outside that range (a size below 100M gets 6e-3,
one above 3B 3e-4), so sizes between the paper's get an LR consistent with its tuning.

Batch: the paper's scaling runs used 0.5M tokens per step. A point whose token budget would give
fewer than `min_steps` steps at that batch has its batch halved (in whole micro-batches) until it
has them, so small budgets still get a schedule with warmup, stable phase and cooldown.
"""
from __future__ import annotations

import math

PAPER_LR = ((0.10e9, 6e-3), (0.35e9, 3e-3), (0.97e9, 6e-4), (2.78e9, 3e-4))  # (non-embedding params, peak LR)
PAPER_BATCH_TOKENS = 1 << 19  # 0.5M tokens per step in the paper's scaling runs


def peak_lr(params: float) -> float:
    """Peak LR for a model of `params` non-embedding parameters (see the module docstring)."""
    xs = [math.log(n) for n, _ in PAPER_LR]
    ys = [math.log(lr) for _, lr in PAPER_LR]
    x = min(max(math.log(params), xs[0]), xs[-1])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x <= x1:
            return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return PAPER_LR[-1][1]


def batch_tokens(tokens: float, max_batch_tokens: int, window_tokens: int, min_steps: int) -> int:
    """Tokens per step: `max_batch_tokens` (a multiple of one micro-batch's `window_tokens`), halved
    while the budget's `tokens` would give fewer than `min_steps` steps; never below one window."""
    if max_batch_tokens % window_tokens:
        raise ValueError(f"--batch-tokens {max_batch_tokens} is not a multiple of micro-batch x seq_len "
                         f"({window_tokens}); choose a multiple")
    windows = max_batch_tokens // window_tokens
    while windows > 1 and tokens / (windows * window_tokens) < min_steps:
        windows //= 2
    return windows * window_tokens
