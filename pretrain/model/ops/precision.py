"""Half-precision activations are computed in fp32 where precision matters (norms, softmax, RoPE,
the SSM's dt); fp64 stays fp64, so a double-precision model is double precision throughout (the
parallel-layout tests compare layouts in fp64, where only a real difference can exceed 1e-9)."""
from torch import Tensor


def wide(t: Tensor) -> Tensor:
    """`t` in fp32, or as is when it is already fp64."""
    return t if t.dtype.is_floating_point and t.element_size() >= 8 else t.float()
