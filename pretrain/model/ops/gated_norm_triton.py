"""Mamba2's gated group-local RMSNorm, RMSNorm(y * SiLU(z)) * weight, forward and backward as Triton
kernels over the mixer's own layouts (z a column slice of the projection's rows).

Compiled, the reference made Inductor keep the gradient of the gated product y * SiLU(z) in fp32
(4 bytes a channel) and recompute the gradients of y and z from it in each of the four kernels
that use them: ~1.3 ms of the 1B hybrid_moe step's Mamba2 layer went to those passes. Here the
forward reads y and z once and writes the output and one fp32 rstd per row and group; the backward
reads the output gradient, y and z once and writes the gradients of y and z in their own dtypes.
A backward program walks many rows, summing the weight gradient in registers into fp32 partials
[programs, d] that torch sums: deterministic, where atomics would not be.
`gated_rms_norm_reference` (gated_norm.py) is the oracle (tests/gpu on CUDA, tests/kernels in Triton's
CPU interpreter).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _kernels():
    from pretrain.model.ops import gated_norm_triton_kernels  # imports triton: only when a kernel runs

    return gated_norm_triton_kernels


def _rows(t: Tensor) -> Tensor:
    """`t` [..., d] as rows [r, d] with contiguous channels: a view where its layout allows."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _block(group: int) -> tuple[int, int]:
    """The power-of-two block holding one group, and warps for it (a warp per 256 channels, 1-8)."""
    from triton import next_power_of_2

    block = max(16, next_power_of_2(group))
    return block, min(max(block // 256, 1), 8)


def gated_norm_triton(y: Tensor, z: Tensor, weight: Tensor, eps: float, n_groups: int) -> tuple[Tensor, Tensor]:
    """(out [..., d] contiguous in weight's dtype, rstd [rows, n_groups] fp32) for y, z [..., d] (any
    row stride) and weight [d]; `gated_rms_norm_reference`'s values."""
    d = y.shape[-1]
    assert z.shape == y.shape and weight.shape == (d,) and d % n_groups == 0, "y, z [..., d], weight [d], groups divide d"
    y2, z2 = _rows(y), _rows(z)
    out = torch.empty(y.shape, device=y.device, dtype=weight.dtype)
    rstd = torch.empty(y2.shape[0], n_groups, device=y.device, dtype=torch.float32)
    if y2.shape[0]:
        block, warps = _block(d // n_groups)
        _kernels().gated_norm_forward[(y2.shape[0], n_groups)](
            y2, y2.stride(0), z2, z2.stride(0), weight.contiguous(), out, rstd, d, d // n_groups, eps, BLOCK=block,
            num_warps=warps)
    return out, rstd


def gated_norm_backward_triton(dout: Tensor, y: Tensor, z: Tensor, weight: Tensor,
                               rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `gated_norm_triton` (y, z, weight) in their inputs' dtypes, y and z's contiguous."""
    d, n_groups = y.shape[-1], rstd.shape[-1]
    dout2, y2, z2 = _rows(dout), _rows(y), _rows(z)
    rows = y2.shape[0]
    dy = torch.empty(y.shape, device=y.device, dtype=y.dtype)
    dz = torch.empty(z.shape, device=z.device, dtype=z.dtype)
    # a few programs per SM, each walking its share of the rows (its weight-gradient partial in registers)
    slots = 4 * torch.cuda.get_device_properties(y.device).multi_processor_count if y.is_cuda else 4
    per_program = max(1, -(-rows // slots))
    programs = -(-rows // per_program)
    dw = torch.zeros(programs, d, device=y.device, dtype=torch.float32)
    if rows:
        block, warps = _block(d // n_groups)
        _kernels().gated_norm_backward[(programs, n_groups)](
            dout2, dout2.stride(0), y2, y2.stride(0), z2, z2.stride(0), weight.contiguous(), rstd, dy, dz, dw, rows,
            d, d // n_groups, per_program, BLOCK=block, num_warps=warps)
    return dy, dz, dw.sum(0).to(weight.dtype)
