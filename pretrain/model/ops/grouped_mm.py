"""Grouped expert matmul: rows sorted by expert, one weight per expert.

`torch._grouped_mm` (one kernel for all experts, Hopper, bf16) on CUDA; a loop over experts as the
reference and on CPU (inside the same custom op, so it compiles without a graph break).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel


def grouped_mm_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """x [t, k] sorted by expert, w [e, k, n], offsets [e] = cumulative row ends -> [t, n]."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def grouped_mm_weight_grad_reference(x: Tensor, dy: Tensor, offsets: Tensor) -> Tensor:
    """The weight gradient: dw[e] = x_e^T dy_e -> [e, k, n] (zero for an expert without rows)."""
    dw = x.new_zeros(offsets.shape[0], x.shape[1], dy.shape[1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        dw[e] = x[start:end].t() @ dy[start:end]
        start = end
    return dw


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Dispatching grouped matmul (a custom op: compiled MoE blocks keep one graph); see
    `grouped_mm_reference` for the contract. Under CUDA autocast the router's input is the fp32
    residual stream: it is cast like autocast would, so the bf16 kernel runs."""
    if wants_fast_kernel(x) and torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16:
        x, w = x.to(torch.bfloat16), w.to(torch.bfloat16)
    if x.is_cuda and not wants_fast_kernel(x):
        return grouped_mm_reference(x, w, offsets)
    return torch.ops.pretrain.grouped_mm(x, w, offsets)  # pretrain/model/ops/library.py
