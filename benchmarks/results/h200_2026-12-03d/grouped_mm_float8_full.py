"""Rowwise FP8 grouped expert matmul (`torch._scaled_grouped_mm`, Hopper) for training.

The routed experts are an MoE model's largest GEMMs, and torchao's Float8Linear cannot take them:
their weights are stacked [E, k, n] tensors run by one grouped GEMM, not nn.Linear. This is that
GEMM in float8 e4m3, forward and backward, on torchao's MoE recipe: every operand is scaled along
the contraction - per token for activations and output gradients, per expert and output column for
weights, per expert and column over the expert's tokens for the weight gradient - by a power of two
(exact to undo). The weight gradient's kernel needs every expert's rows to start at a multiple of
16 (`ALIGN`): `AlignedGroups` lays the sorted rows out so, the gaps zero.

`scaled_grouped_mm_reference` dequantizes the same float8 operands and multiplies in fp32: the
kernel must match it up to summation order. It also runs wherever the kernel cannot (CPU tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.grouped_mm import grouped_mm_reference, grouped_mm_weight_grad_reference

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
ALIGN = 16  # rows per expert group: a multiple of 16 bytes of float8 along the weight gradient's sum


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


# ---- quantization ---------------------------------------------------------------------------------


def power_of_two_scale(amax: Tensor) -> Tensor:
    """The largest power of two that keeps amax within e4m3's range (fp32; huge for a zero amax)."""
    return torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax.float().clamp(min=1e-12))))


def to_e4m3(t: Tensor, scale: Tensor) -> Tensor:
    return (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """t scaled per row (over its last dim) -> (contiguous float8 of t's shape, fp32 dequantization
    scales of shape t.shape[:-1])."""
    scale = power_of_two_scale(t.abs().amax(-1, keepdim=True))
    return to_e4m3(t, scale).contiguous(), scale.reciprocal().squeeze(-1)


def quantize_group_columns(t: Tensor, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """t [L, c], its rows in groups ending at `offsets` (multiples of ALIGN, the last at L), scaled
    per group and column -> (float8 [L, c], dequantization scales [groups * c], group-major: the
    layout the weight gradient's kernel takes). Groups are whole ALIGN-row blocks: the amax is
    taken per block, then per group."""
    blocks = t.view(-1, ALIGN, t.shape[-1])
    block_amax = blocks.abs().amax(1).float()
    starts = torch.arange(0, t.shape[0], ALIGN, device=t.device, dtype=offsets.dtype)
    group = torch.searchsorted(offsets, starts, right=True)
    amax = block_amax.new_zeros(offsets.shape[0], t.shape[-1]).scatter_reduce(
        0, group[:, None].expand_as(block_amax), block_amax, "amax")
    scale = power_of_two_scale(amax)
    return to_e4m3(blocks, scale[group][:, None]).view(t.shape), scale.reciprocal().flatten()


# ---- the GEMM: kernel and reference ---------------------------------------------------------------


def scaled_grouped_mm_reference(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offsets: Tensor) -> Tensor:
    """The contract of `torch._scaled_grouped_mm` for our two layouts, in fp32 on dequantized
    operands (bf16 out). a [t, k] x b [E, k, n] (rows in groups; scales [t], [E, n]) -> [t, n];
    a [k, t] x b [t, n] (the sum over t in groups; scales [E * k], [E * n]) -> [E, k, n]."""
    if b.dim() == 3:
        out = grouped_mm_reference(a.float() * scale_a[:, None], b.float() * scale_b[:, None], offsets)
        return out.to(torch.bfloat16)
    e = offsets.shape[0]
    group = torch.searchsorted(offsets, torch.arange(a.shape[1], device=a.device, dtype=offsets.dtype), right=True)
    group = group.clamp(max=e - 1)  # rows past the last group take part in no product
    a32 = a.float() * scale_a.view(e, -1)[group].t()
    b32 = b.float() * scale_b.view(e, -1)[group]
    return grouped_mm_weight_grad_reference(a32.t(), b32, offsets).to(torch.bfloat16)


def scaled_grouped_mm(a: Tensor, b: Tensor, scale_a: Tensor, scale_b: Tensor, offsets: Tensor,
                      fast_accum: bool) -> Tensor:
    """`torch._scaled_grouped_mm` (a row-major, b column-major, offsets int32) where it runs, else
    the reference; `fast_accum`: Hopper's faster, less exact float8 accumulation (forward only, as
    torchao's Float8Linear does)."""
    if wants_fast_kernel(a) and has_scaled_grouped_mm():
        return torch._scaled_grouped_mm(a, b, scale_a, scale_b, offs=offsets, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum)
    return scaled_grouped_mm_reference(a, b, scale_a, scale_b, offsets)


class _Float8GroupedMM(torch.autograd.Function):
    """x [L, k] in aligned groups times w [E, k, n] -> bf16 [L, n]; both gradients in float8 GEMMs.
    Saves x and w in their own precision and quantizes them again in backward (the layouts differ)."""

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
        if ctx.needs_input_grad[0]:  # dy [L, n] x w^T [E, n, k]
            dq, ds = quantize_rows(dy)
            wq, ws = quantize_rows(w)  # per expert and input row, over n
            dx = scaled_grouped_mm(dq, wq.transpose(-2, -1), ds, ws, offsets, fast_accum=False).to(x.dtype)
        if ctx.needs_input_grad[1]:  # x^T [k, L] x dy [L, n], summed per group
            xq, xs = quantize_group_columns(x, offsets)
            dq, ds = quantize_group_columns(dy, offsets)
            dw = scaled_grouped_mm(xq.t().contiguous(), dq.t().contiguous().t(), xs, ds, offsets,
                                   fast_accum=False).to(w.dtype)
        return dx, dw, None


def grouped_mm_float8(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """`grouped_mm` in rowwise float8: x [L, k] in groups of `AlignedGroups`, w [E, k, n], offsets
    [E] int32 group ends -> bf16 [L, n]."""
    return _Float8GroupedMM.apply(x, w, offsets)


@dataclass(frozen=True)
class AlignedGroups:
    """Rows sorted by expert, moved so each expert's group starts at a multiple of ALIGN, in a buffer
    of a length fixed by the row and expert counts alone (t + (ALIGN - 1) * E, rounded up to ALIGN:
    shapes do not depend on the routing, so nothing recompiles). The last group runs to the buffer's
    end, so every row is in a group; the gaps are zero and stay zero through the experts' SwiGLU."""

    rows: Tensor  # [t]: where each sorted row goes
    offsets: Tensor  # [E] int32: group ends in the buffer
    length: int

    @classmethod
    def of(cls, counts: Tensor, n_rows: int) -> AlignedGroups:
        length = -(-(n_rows + (ALIGN - 1) * counts.shape[0]) // ALIGN) * ALIGN
        ends = counts.cumsum(0)
        aligned = (counts + ALIGN - 1) // ALIGN * ALIGN
        aligned_ends = aligned.cumsum(0)
        shift = (aligned_ends - aligned) - (ends - counts)  # each group's start, moved
        index = torch.arange(n_rows, device=counts.device)
        rows = index + shift[torch.searchsorted(ends, index, right=True)]
        offsets = torch.cat([aligned_ends[:-1], aligned_ends.new_full((1,), length)]).to(torch.int32)
        return cls(rows, offsets, length)

    def pad(self, x: Tensor) -> Tensor:
        return x.new_zeros(self.length, x.shape[-1]).index_copy(0, self.rows, x)

    def unpad(self, y: Tensor) -> Tensor:
        return y.index_select(0, self.rows)
