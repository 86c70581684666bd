"""Causal depthwise conv1d (Mamba2's short conv over x, B, C) with an optional carried-in state."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None,
                            state: Tensor | None = None) -> Tensor:
    """x [b, d, l], weight [d, w]; `state` [b, d, w-1] holds the previous inputs (zeros if None).

    Returns SiLU(conv(x)) [b, d, l].
    """
    w = weight.shape[-1]
    prev = state if state is not None else x.new_zeros(x.shape[0], x.shape[1], w - 1)
    y = F.conv1d(torch.cat([prev.to(x.dtype), x], dim=-1), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y)


@functools.cache
def _causal_conv1d_fn():
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # causal-conv1d is optional (it needs a CUDA build)
        return None
    return causal_conv1d_fn


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None = None) -> Tensor:
    """Dispatching conv: causal-conv1d's CUDA kernel when installed (no carried state), else the reference."""
    kernel = _causal_conv1d_fn() if wants_fast_kernel(x) and state is None else None
    if kernel is None:
        return causal_conv1d_reference(x, weight, bias, state)
    return kernel(x, weight, bias, activation="silu")
