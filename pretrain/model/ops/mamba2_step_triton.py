"""Mamba2's one-token decode step as two Triton kernels: the conv (SiLU, state shifted in place),
then the SSM update (dt's softplus, the decay, the rank-1 input, y = state C, the D skip; the fp32
state updated in place). Compiled, the PyTorch step took ~10 small kernels per layer (the conv's
window, the splits, dt, the update, the skip, the state copies), ~20 us of a 1B Mamba2 layer's ~97
us decode time on the H200. `mamba2_step_reference` (mamba2_step.py) is the oracle (tests/gpu on
CUDA, tests/kernels in Triton's CPU interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernels():
    from pretrain.model.ops import mamba2_step_triton_kernels  # imports triton: only when a kernel runs

    return mamba2_step_triton_kernels


def mamba2_step_triton(xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                       dt_bias: Tensor, A_log: Tensor, D: Tensor, ssm_state: Tensor, head_dim: int) -> Tensor:
    """`mamba2_step_reference`'s contract with both states updated in place; y [b, h * p] in xbc's dtype."""
    b, conv_dim = xbc.shape
    h, n = ssm_state.shape[1], ssm_state.shape[-1]
    w = conv_weight.shape[-1]
    assert conv_state.is_contiguous() and ssm_state.is_contiguous() and ssm_state.dtype == torch.float32
    xbc, dt = (t if t.stride(-1) == 1 else t.contiguous() for t in (xbc, dt))
    act = torch.empty(b, conv_dim, device=xbc.device, dtype=xbc.dtype)
    y = torch.empty(b, h * head_dim, device=xbc.device, dtype=xbc.dtype)
    from triton import next_power_of_2 as pow2

    kernels, block = _kernels(), 256
    kernels.conv_step[(b, -(-conv_dim // block))](
        xbc, xbc.stride(0), conv_state, conv_weight.contiguous(), conv_bias, act, conv_dim, W=w,
        HAS_BIAS=conv_bias is not None, BLOCK=block, BLOCK_W=pow2(w), num_warps=4)
    groups = (conv_dim - h * head_dim) // (2 * n)
    block_p = min(32, pow2(head_dim))
    kernels.ssm_step[(b, h, -(-head_dim // block_p))](
        act, dt, dt.stride(0), dt_bias, A_log, D, ssm_state, y, h, head_dim, n, h // groups, conv_dim,
        BLOCK_P=block_p, BLOCK_N=pow2(n), num_warps=4)
    return y
