"""Grouped expert matmul: rows sorted by expert, one weight per expert.

`torch._grouped_mm` (one kernel for all experts, Hopper, bf16) on CUDA, with every expert's rows
starting at a multiple of `ALIGN_ROWS` (padding rows between groups, as TorchTitan does); a loop
over experts as the reference and on CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel

# Row alignment of each expert's group for torch._grouped_mm in bf16 (16 bytes of rows' starts;
# TorchTitan's TOKEN_GROUP_ALIGN_SIZE_M for bf16).
ALIGN_ROWS = 8


def grouped_mm_reference(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """x [t, k] sorted by expert, w [e, k, n], offsets [e] = cumulative row ends -> [t, n]."""
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(offsets.tolist()):
        out[start:end] = x[start:end] @ w[e]
        start = end
    return out


def aligned_rows(offsets: Tensor, rows: int, align: int) -> tuple[Tensor, Tensor, int]:
    """Where each of `rows` rows (grouped by `offsets`, cumulative ends) goes when every group
    starts at a multiple of `align`: (destination row [rows], the padded groups' cumulative ends
    [e], a row count that holds them all). No host sync: the count is the bound rows + e*(align-1)."""
    counts = torch.diff(offsets, prepend=offsets.new_zeros(1))
    padded_ends = ((counts + align - 1) // align * align).cumsum(0)
    padded_starts = padded_ends - (counts + align - 1) // align * align
    group = torch.repeat_interleave(torch.arange(offsets.numel(), device=offsets.device), counts, output_size=rows)
    dest = padded_starts[group] + torch.arange(rows, device=offsets.device) - (offsets - counts)[group]
    return dest, padded_ends, rows + offsets.numel() * (align - 1)


def _fast_dtype(x: Tensor) -> torch.dtype | None:
    """bf16 when `torch._grouped_mm` can run (CUDA, sm90+, bf16 inputs or bf16 autocast), else None.
    Under autocast the router's input is the fp32 residual stream: cast it like autocast would."""
    if not (wants_fast_kernel(x) and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device)[0] >= 9):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype == torch.bfloat16 else None


def grouped_mm(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Dispatching grouped matmul; see `grouped_mm_reference` for the contract."""
    dtype = _fast_dtype(x)
    if dtype is None:
        return grouped_mm_reference(x, w, offsets)
    dest, padded_ends, total = aligned_rows(offsets, x.shape[0], ALIGN_ROWS)
    padded = x.new_zeros(total, x.shape[1], dtype=dtype).index_copy(0, dest, x.to(dtype))
    return torch._grouped_mm(padded, w.to(dtype), offs=padded_ends.to(torch.int32))[dest]
