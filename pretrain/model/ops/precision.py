"""Half-precision activations are computed in fp32 where precision matters (norms, softmax, RoPE,
the SSM's dt); fp64 stays fp64, so a double-precision model is double precision throughout (the
parallel-layout tests compare layouts in fp64, where only a real difference can exceed 1e-9) but for
RoPE's angles, fp32 in every dtype as in transformers' Llama (`rope.rope_inv_freq`): the same
rotation on every layout, and the exported model's."""
import torch
from torch import Tensor


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a tensor of `dtype` computes (or accumulates, as the SSM state) in: fp64 stays fp64,
    anything else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide(t: Tensor) -> Tensor:
    """`t` in `wide_dtype`: fp32, or as is when it is already fp64."""
    return t.to(wide_dtype(t.dtype))


def compute_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype a matmul or conv of `a` and `b` computes in here: autocast's where it is on (it
    narrows only fp32 / fp16 / bf16 inputs: an fp64 run stays fp64), else the inputs' common one."""
    device, dtype = a.device.type, torch.promote_types(a.dtype, b.dtype)
    # meta has no autocast; not torch.amp.is_autocast_available: torch 2.11's Dynamo cannot trace
    # it, and this runs inside compiled blocks (the conv taps)
    if device == "meta":
        return dtype
    if torch.is_autocast_enabled(device) and dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return dtype
