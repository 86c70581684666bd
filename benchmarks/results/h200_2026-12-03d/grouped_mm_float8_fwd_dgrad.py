"""Rowwise FP8 grouped expert matmul (`torch._scaled_grouped_mm`, Hopper) for training.

The routed experts are an MoE model's largest GEMMs, and torchao's Float8Linear cannot take them:
their weights are stacked [E, k, n] tensors run by one grouped GEMM, not nn.Linear. This runs that
GEMM's forward and its input gradient in float8 e4m3, every operand scaled along the contraction -
per token for activations and output gradients, per expert and output (input) column for the
weights - by a power of two (exact to undo). The weight gradient stays a bf16 grouped GEMM: in
float8 it sums over each expert's tokens, so it needs per-expert column scales and transposed
float8 copies of both activations, and on the H200 at 1B hybrid_moe's shape those passes cost more
than its faster GEMM saved (benchmarks/results/h200_2026-12-04/).

`scaled_grouped_mm_reference` dequantizes the same float8 operands and multiplies in fp32: the
kernel must match it up to summation order. It also runs wherever the kernel cannot (CPU tests).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.grouped_mm import grouped_mm_reference
from pretrain.model.ops.library import grouped_mm_weight_grad_op

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
ALIGN = 16  # the kernel's operand dims must be multiples of 16 (bytes of float8)


@functools.cache
def _kernel_available() -> bool:
    return (hasattr(torch, "_scaled_grouped_mm") and torch.cuda.is_available()
            and torch.cuda.get_device_capability()[0] >= 9)


@torch.compiler.assume_constant_result
def has_scaled_grouped_mm() -> bool:
    """`torch._scaled_grouped_mm` runs on this machine's GPU (Hopper or newer)."""
    return _kernel_available()


def float8_grouped_applies(x: Tensor) -> bool:
    """The FP8 experts run for x: a CUDA tensor on a GPU with the kernel, with gradients on
    (inference, decoding included, keeps the bf16 experts: a few rows per expert gain nothing)."""
    return wants_fast_kernel(x) and torch.is_grad_enabled() and has_scaled_grouped_mm()


def row_amax(t: Tensor) -> Tensor:
    """max |t| over the last dim (kept). Over a strided last dim (a transposed weight) in two stages:
    compiled in one, Inductor fused the transposing cast that follows into the reduction, and its
    uncoalesced stores took 224 us per 1B expert weight on the H200 where the cast alone needs ~40."""
    if t.stride(-1) != 1 and t.shape[-1] % ALIGN == 0:
        return t.abs().unflatten(-1, (-1, ALIGN)).amax(-1).amax(-1, keepdim=True)
    return t.abs().amax(-1, keepdim=True)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """t scaled per row (over its last dim) by the largest power of two that keeps the row's amax
    within e4m3 -> (contiguous float8 of t's shape, fp32 dequantization scales t.shape[:-1])."""
    amax = row_amax(t).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    q = (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q.contiguous(), scale.reciprocal().squeeze(-1)


def scaled_grouped_mm_reference(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offsets: Tensor) -> Tensor:
    """`torch._scaled_grouped_mm`'s contract for rows in groups: a [t, k] float8 (scales [t]) times
    b [E, k, n] float8 (scales [E, n]), rows up to offsets[e] by expert e -> bf16 [t, n]; in fp32 on
    the dequantized operands."""
    return grouped_mm_reference(a.float() * scale_a[:, None], b.float() * scale_b[:, None], offsets).to(torch.bfloat16)


def scaled_grouped_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offsets: Tensor,
                      fast_accum: bool) -> Tensor:
    """`torch._scaled_grouped_mm` (a row-major, b column-major) where it runs, else the reference;
    `fast_accum`: Hopper's faster, less exact float8 accumulation (forward only, as torchao's
    Float8Linear does)."""
    if wants_fast_kernel(a) and has_scaled_grouped_mm():
        return torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=offsets.to(torch.int32),
                                        out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
    return scaled_grouped_mm_reference(a, b, scale_a, scale_b, offsets)


class _Float8GroupedMM(torch.autograd.Function):
    """x [t, k] sorted by expert times w [E, k, n] -> bf16 [t, n]. Saves x and w in their own
    precision and quantizes w again in backward, along the other dim."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, w, offsets)
        xq, xs = quantize_rows(x)
        wq, ws = quantize_rows(w.transpose(-2, -1))  # per expert and output column, over k
        return scaled_grouped_mm(xq, wq.transpose(-2, -1), xs, ws, offsets, fast_accum=True)

    @staticmethod
    def backward(ctx, dy: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, w, offsets = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:  # dy [t, n] x w^T [E, n, k]
            dq, ds = quantize_rows(dy)
            wq, ws = quantize_rows(w)  # per expert and input row, over n
            dx = scaled_grouped_mm(dq, wq.transpose(-2, -1), ds, ws, offsets, fast_accum=False).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dw = grouped_mm_weight_grad_op(x.to(dy.dtype), dy, offsets).to(w.dtype)
        return dx, dw, None


def grouped_mm_float8(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """`grouped_mm` with the forward and input-gradient GEMMs in rowwise float8: x [t, k] sorted by
    expert, w [E, k, n], offsets [E] group ends; k and n multiples of ALIGN -> bf16 [t, n]."""
    return _Float8GroupedMM.apply(x, w, offsets)
