"""Half-precision activations are computed in fp32 where precision matters (norms, softmax, RoPE,
the SSM's dt); fp64 stays fp64, so a double-precision model is double precision throughout (the
parallel-layout tests compare layouts in fp64, where only a real difference can exceed 1e-9)."""
import torch
from torch import Tensor


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a tensor of `dtype` computes (or accumulates, as the SSM state) in: fp64 stays fp64,
    anything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide(t: Tensor) -> Tensor:
    """`t` in `wide_dtype`: fp32, or as is when it is already fp64."""
    return t.to(wide_dtype(t.dtype))
