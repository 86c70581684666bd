"""Causal depthwise conv1d (Mamba2's short conv over x, B, C) with an optional carried-in state and
optional per-token document ids (`seq_idx` [b, l]): an output sees only inputs of its own
document (a carried-in state belongs to the first token's document)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.library import has_causal_conv1d, has_triton
from pretrain.model.ops.precision import compute_dtype, wide


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None,
                            state: Tensor | None = None, seq_idx: Tensor | None = None,
                            cache: dict | None = None) -> Tensor:
    """x [b, d, l], weight [d, w]; `state` [b, d, w-1] holds the previous inputs (zeros if None);
    `cache` (a batch's PackedDocs.kernel_cache) keeps what depends on `seq_idx` alone across layers.

    Returns SiLU(conv(x)) [b, d, l].
    """
    if torch.compiler.is_compiling():  # taps: one fused kernel in the data's own layout, no cuDNN conv
        return _conv_taps(x, state, weight, bias, seq_idx)
    if x.shape[-1] == 0:  # no output position (F.conv1d refuses an input shorter than the kernel)
        return x.new_empty(x.shape, dtype=compute_dtype(x, weight))
    w = weight.shape[-1]
    prev = state if state is not None else x.new_zeros(x.shape[0], x.shape[1], w - 1)
    padded = torch.cat([prev.to(x.dtype), x], dim=-1)
    if seq_idx is None:
        y = F.conv1d(padded, weight[:, None, :], bias, groups=x.shape[1])
    else:
        dtype = compute_dtype(padded, weight)
        y = _ConvRecomputingAfterStarts.apply(padded.to(dtype), weight.to(dtype),
                                              bias.to(dtype) if bias is not None else None,
                                              *_taps_after_starts(seq_idx, w, cache))
    return F.silu(y)


def padded_doc_ids(seq_idx: Tensor, w: int) -> Tensor:
    """Document ids [b, l + w - 1] of the conv's padded input: the carried-in state's w - 1 inputs
    belong to the first token's document."""
    return torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=1)


def _conv_taps(x: Tensor, state: Tensor | None, weight: Tensor, bias: Tensor | None,
               seq_idx: Tensor | None) -> Tensor:
    """SiLU(conv(x)) as in the reference (x [b, d, l]), the conv as w shifted products: tap k reads
    input t + k - (w-1), dropped when it lies in another document. The padded input, the taps and
    the SiLU are over [b, l, d], channels contiguous as the projection wrote them (x is its
    transposed view), and only the result is transposed back, as a view: compiled, the taps, bias
    and SiLU fuse into one coalesced kernel (their backward into a few), and the one materialised
    intermediate, the padded input, is channels-last. Over [b, d, l] Inductor wrote the padded
    input and the output channels-first (as cuDNN's depthwise conv wants them) and copied the
    output back across rows for the scan."""
    w, l = weight.shape[-1], x.shape[-1]
    dtype = compute_dtype(x, weight)  # as the eager conv: autocast's where it is on
    rows = x.transpose(1, 2).to(dtype)  # [b, l, d]
    b, _, d = rows.shape
    prev = state.transpose(1, 2).to(dtype) if state is not None else rows.new_zeros(b, w - 1, d)
    padded = torch.cat([prev, rows], dim=1)  # [b, l + w - 1, d]
    docs = padded_doc_ids(seq_idx, w) if seq_idx is not None else None
    y = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=x.device)
    for k in range(w):
        tap = padded[:, k:k + l] * weight[:, k].to(dtype)
        if docs is not None:
            tap = tap * (docs[:, k:k + l] == seq_idx)[..., None].to(dtype)
        y = y + tap
    return F.silu(y).transpose(1, 2)


def _taps_after_starts(seq_idx: Tensor, w: int, cache: dict | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The outputs that reach back into a previous document (the w-1 after each start) as (rows,
    t) [n], the padded columns they read, cols [n, w], and which of those taps lie in their own
    document, inside [n, w]. They depend on the documents alone: with `cache` (a batch's
    PackedDocs.kernel_cache), one device sync per batch, not per layer."""
    key = ("conv_taps", w, tuple(seq_idx.shape))
    found = cache.get(key) if cache is not None else None
    if found is None:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))  # [b, l], True where a document starts
        reach = F.pad(starts, (w - 2, 0)).unfold(1, w - 1, 1).any(-1)  # a start among the last w-1 positions
        rows, t = reach.nonzero(as_tuple=True)  # each affected output once
        docs = padded_doc_ids(seq_idx, w)
        cols = t[:, None] + torch.arange(w, device=t.device)  # [n, w]: output t reads padded t .. t+w-1
        found = rows, t, cols, docs[rows[:, None], cols] == seq_idx[rows, t][:, None]
        if cache is not None:
            cache[key] = found
    return found


class _ConvRecomputingAfterStarts(torch.autograd.Function):
    """The conv over whole rows (cuDNN / the depthwise kernel), then the few outputs that reach
    back into a previous document recomputed without those taps, written in place. The backward
    takes the conv's own gradients and corrects them at the dropped taps, in place. Built from
    autograd ops instead, the fix-up cost three extra passes over [b, d, l] per layer (the
    index_put backward's clone of the output gradient, the gathered taps' dense zero gradient and
    its add): the masked 1B mamba2 step ran at 0.96x the plain one on the H200. Inputs share one
    dtype (the caller casts as autocast would); autocast is off inside."""

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, t: Tensor, cols: Tensor,
                inside: Tensor) -> Tensor:
        with torch.autocast(padded.device.type, enabled=False):
            y = F.conv1d(padded, weight[:, None, :], bias, groups=padded.shape[1])
            taps = padded[rows[:, None], :, cols]  # [n, w, d]
            fixed = (taps * (inside[..., None] * weight.t())).sum(1)  # [n, d]
            y[rows, :, t] = fixed + bias if bias is not None else fixed
        ctx.save_for_backward(padded, weight, rows, t, cols, inside)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor | None, ...]:
        padded, weight, rows, t, cols, inside = ctx.saved_tensors
        d = weight.shape[0]
        grad_y = grad_y.contiguous()
        grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_y, padded, weight[:, None, :], [d] if ctx.has_bias else None, [1], [0], [1], False, [0], d,
            list(ctx.needs_input_grad[:3]))
        # what the conv's backward gave the taps the forward dropped: the output gradient, per tap
        dropped = grad_y[rows, :, t][:, None, :] * (~inside)[..., None].to(grad_y.dtype)  # [n, w, d]
        if grad_in is not None:
            channels = torch.arange(d, device=rows.device)
            grad_in.index_put_((rows[:, None, None], channels, cols[..., None]), -(dropped * weight.t()),
                               accumulate=True)
        if grad_w is not None:
            grad_w = grad_w[:, 0] - (dropped * padded[rows[:, None], :, cols]).sum(0).t()
        return grad_in, grad_w, grad_b, None, None, None, None


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None = None,
                  seq_idx: Tensor | None = None, cache: dict | None = None) -> Tensor:
    """Dispatching conv (custom ops, see library.py) on CUDA without a carried-in state:
    causal-conv1d's CUDA kernel when installed, else our Triton kernels (conv_triton.py); the
    reference otherwise (also for fp64). causal-conv1d takes `seq_idx` (int32) only in channel-last
    layout (x.stride(1) == 1), whose rows it needs 8-element aligned; ours read the rows
    x.transpose(1, 2) as the projection wrote them (x, B and C: a column slice of its output)."""
    dtype = compute_dtype(x, weight)  # autocast's, as the reference
    if not (wants_fast_kernel(x) and state is None and dtype != torch.float64 and (has_causal_conv1d() or has_triton())):
        return causal_conv1d_reference(x, weight, bias, state, seq_idx, cache)
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    if not has_causal_conv1d():
        rows = torch.ops.pretrain.conv_silu_rows(x.transpose(1, 2).to(dtype), weight.to(dtype),
                                                 bias.to(dtype) if bias is not None else None, seq_idx)
        return rows.transpose(1, 2)
    channel_last = x.stride(1) == 1
    if (seq_idx is not None and not channel_last) or (channel_last and x.stride(2) % 8):
        x = x.transpose(1, 2).contiguous().transpose(1, 2)  # channel-last with 16-byte aligned rows
    return torch.ops.pretrain.causal_conv1d(x, weight, bias, seq_idx)


def causal_conv1d_step(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor) -> tuple[Tensor, Tensor]:
    """One decoding token: x [b, d, 1], `state` [b, d, w-1] (the previous inputs) -> (SiLU(conv) [b, d, 1],
    the next state [b, d, w-1]). Elementwise and a sum over w taps, so a compiled decode step fuses it
    (a conv kernel launch per layer otherwise); equals `causal_conv1d_reference` with that state."""
    window = torch.cat([state.to(x.dtype), x], dim=-1)  # [b, d, w]
    y = (wide(window) * wide(weight)).sum(-1, keepdim=True)  # fp32 accumulation, as the conv kernels
    if bias is not None:
        y = y + wide(bias)[:, None]
    return F.silu(y).to(x.dtype), window[..., 1:]
