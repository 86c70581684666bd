"""Mamba2's gated, group-local RMSNorm: RMSNorm(y * SiLU(z)) over each of n_groups channel slices.

On CUDA our Triton kernels (gated_norm_triton.py) fuse the gate, the norm and their backward: one
pass over [tokens, d_ssm] each way instead of several fp32 elementwise passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.precision import wide
from pretrain.model.ops.library import has_triton


def group_rms_norm(x: Tensor, weight: Tensor, eps: float, n_groups: int = 1) -> Tensor:
    """RMSNorm over each of `n_groups` equal slices of the last dim, in fp32 (1 group = plain RMSNorm)."""
    shape = x.shape
    x = wide(x).reshape(*shape[:-1], n_groups, shape[-1] // n_groups)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (x.reshape(shape) * wide(weight)).type_as(weight)


def sharded_rms_norm(x: Tensor, weight: Tensor, eps: float, full_width: int, group) -> Tensor:
    """RMSNorm of a tensor whose last dim is this rank's slice of one `full_width` normalisation
    group: the sum of squares is summed over `group` (tensor parallelism), so the result equals the
    unsharded norm's slice exactly."""
    from parallel.tensor_parallel import all_reduce_sum

    x = wide(x)
    ss = all_reduce_sum(x.pow(2).sum(-1, keepdim=True), group)
    return (x * torch.rsqrt(ss / full_width + eps) * wide(weight)).type_as(weight)


def gated_rms_norm_reference(y: Tensor, z: Tensor, weight: Tensor, eps: float, n_groups: int = 1) -> Tensor:
    return group_rms_norm(wide(y) * F.silu(wide(z)), weight, eps, n_groups)


def gated_rms_norm(y: Tensor, z: Tensor, weight: Tensor, eps: float, n_groups: int = 1) -> Tensor:
    """RMSNorm(y * SiLU(z)) * weight per group, in weight's dtype: our Triton kernels on CUDA (a custom
    op, so a compiled block traces it whole), else the reference."""
    if wants_fast_kernel(y) and has_triton() and torch.float64 not in (y.dtype, z.dtype, weight.dtype):
        return torch.ops.pretrain.gated_rms_norm(y, z, weight, eps, n_groups)[0]
    return gated_rms_norm_reference(y, z, weight, eps, n_groups)
