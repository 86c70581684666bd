"""One AdamW step of an fp32 master parameter in one Triton kernel that also writes its bf16 working
copy (`parallel.mixed_precision.WorkingCopies`).

With torch's fused AdamW the step of a one-GPU bf16 run reads and writes memory three times per
parameter: the cast to bf16 before forward (4 + 2 bytes), the cast of the bf16 gradient to fp32 in
backward (2 + 4) and the update (param, fp32 grad, both moments: 16 + 12). For the 3.5B parameters
of the 1B hybrid_moe that is ~140 GB, ~47 ms of a 345 ms step on an H200. This kernel reads the
bf16 gradient where autograd left it and writes the copy as it updates: 14 + 14 bytes (on the H200,
25.1 ms per step for those 3.5B parameters, 3.95 TB/s; docs/benchmarks.md, "Working copies").

The arithmetic is torch.optim.AdamW's (decoupled weight decay, bias corrections, eps outside the
square root) in fp32, with IEEE-rounded square root and division; `AdamWWithCopies`'s reference
path, torch's own AdamW, is the GPU test's oracle.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from pretrain.model.ops.library import has_triton

BLOCK = 2048  # elements per program


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_with_copy(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, copy_ptr, numel, grad_scale, decay,
                        one_minus_beta1, beta2, one_minus_beta2, step_size, bias_correction2_sqrt, eps,
                        BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < numel
        param = tl.load(param_ptr + offsets, mask=mask)
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_scale
        exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
        exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
        param = param * decay
        exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)  # torch's lerp(grad, 1 - beta1)
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
        denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
        param = param - step_size * tl.div_rn(exp_avg, denom)
        tl.store(param_ptr + offsets, param, mask=mask)
        tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
        tl.store(copy_ptr + offsets, param.to(copy_ptr.dtype.element_ty), mask=mask)

    return adamw_with_copy


def kernel_applies(param: Tensor, grad: Tensor, copy: Tensor, *moments: Tensor) -> bool:
    """CUDA, fp32 master and moments (as many as exist yet), every tensor contiguous (autograd gives
    a gradient its parameter's layout) and of the master's shape, Triton installed: the kernel reads
    them all as flat arrays of the same length."""
    tensors = (param, grad, copy, *moments)
    return (param.device.type == "cuda" and has_triton()
            and all(t.dtype == torch.float32 for t in (param, *moments))
            and all(t.device == param.device and t.is_contiguous() and t.shape == param.shape for t in tensors))


def adamw_with_copy_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, copy: Tensor, *,
                     step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                     grad_scale: float) -> None:
    """AdamW step `step` (counted from 1) of `param` with `grad * grad_scale`, in place, then
    copy <- param in the copy's dtype. Needs `kernel_applies`. The scalars are worked out here in
    double precision, as torch's AdamW does (1 - beta1 in fp32 on the GPU would differ by 2e-7)."""
    numel = param.numel()
    _kernel()[(-(-numel // BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, copy, numel, grad_scale, 1 - lr * weight_decay, 1 - beta1, beta2,
        1 - beta2, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, eps, BLOCK=BLOCK, num_warps=8)
