"""Grouped expert matmul: rows sorted by expert, one weight per expert.

`torch._grouped_mm` (one kernel for all experts, Hopper, bf16) on CUDA; a loop over experts as the
reference and on CPU.
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
    if dtype is not None:
        return torch._grouped_mm(x.to(dtype), w.to(dtype), offs=offsets.to(torch.int32))
    return grouped_mm_reference(x, w, offsets)
