"""Mamba2's one-token decode step after the input projection: the causal conv over [x, B, C] from its
state, SiLU, dt = softplus(dt + dt_bias), the SSM recurrence from its state, and the D skip.

On CUDA our two Triton kernels (mamba2_step_triton.py) do it, updating both states in place (a custom
op, so a compiled decode block traces it whole); elsewhere the PyTorch reference, built from the
conv step and `ssd_step`, returns new states.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.conv import causal_conv1d_step
from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.library import has_triton
from pretrain.model.ops.precision import wide
from pretrain.model.ops.ssd import ssd_step


def mamba2_step_reference(xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor,
                          conv_bias: Tensor | None, dt_bias: Tensor, A_log: Tensor, D: Tensor, ssm_state: Tensor,
                          head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """xbc [b, conv_dim] (x [h * p], then B and C [groups * n] each, before the conv), dt [b, h] (before
    the softplus), conv_state [b, conv_dim, w-1], conv weight [conv_dim, w], ssm_state [b, h, p, n]
    -> (y [b, h * p] in xbc's dtype, the next conv state, the next SSM state)."""
    b, h, n = xbc.shape[0], ssm_state.shape[1], ssm_state.shape[-1]
    act, conv_state = causal_conv1d_step(xbc[..., None], conv_weight, conv_bias, conv_state)
    gn = (xbc.shape[1] - h * head_dim) // 2
    x, B, C = act[..., 0].split([h * head_dim, gn, gn], dim=-1)
    x = x.reshape(b, 1, h, head_dim)
    B, C = (t.reshape(b, 1, -1, n) for t in (B, C))
    dt = F.softplus(wide(dt) + wide(dt_bias))[:, None]
    y, ssm_state = ssd_step(x, dt, -torch.exp(wide(A_log)), B, C, ssm_state)
    y = y + x * D.to(x.dtype)[:, None]
    return y.reshape(b, -1), conv_state, ssm_state


def mamba2_step(xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                dt_bias: Tensor, A_log: Tensor, D: Tensor, ssm_state: Tensor,
                head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """`mamba2_step_reference`; on CUDA (fp32 SSM state, no fp64) our kernels, which update the states
    in place and return them: a static cache's buffers stay where they are; a growing cache's states
    (slices of the prefill's tensors) are made contiguous first and returned as new tensors."""
    if (wants_fast_kernel(xbc) and has_triton() and ssm_state.dtype == torch.float32
            and conv_state.dtype == xbc.dtype and xbc.dtype != torch.float64):
        conv_state, ssm_state = conv_state.contiguous(), ssm_state.contiguous()
        y = torch.ops.pretrain.mamba2_step(xbc, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D,
                                           ssm_state, head_dim)
        return y, conv_state, ssm_state
    return mamba2_step_reference(xbc, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, head_dim)
