"""Causal depthwise conv1d (Mamba2's short conv over x, B, C) with an optional carried-in state and
optional per-token document ids (`seq_idx` [b, l]): an output sees only inputs of its own
document (a carried-in state belongs to the first token's document)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.library import has_causal_conv1d
from pretrain.model.ops.precision import wide


def causal_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None,
                            state: Tensor | None = None, seq_idx: Tensor | None = None,
                            cache: dict | None = None) -> Tensor:
    """x [b, d, l], weight [d, w]; `state` [b, d, w-1] holds the previous inputs (zeros if None);
    `cache` (a batch's PackedDocs.kernel_cache) keeps what depends on `seq_idx` alone across layers.

    Returns SiLU(conv(x)) [b, d, l].
    """
    w = weight.shape[-1]
    prev = state if state is not None else x.new_zeros(x.shape[0], x.shape[1], w - 1)
    padded = torch.cat([prev.to(x.dtype), x], dim=-1)
    y = F.conv1d(padded, weight[:, None, :], bias, groups=x.shape[1])
    if seq_idx is not None:
        if torch.compiler.is_compiling():  # no data-dependent shape: the block stays one graph
            y = _conv_within_documents(padded, weight, bias, seq_idx)
        else:
            y = _recompute_after_starts(y, padded, weight, bias, seq_idx, cache)
    return F.silu(y)


def _conv_within_documents(padded: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor) -> Tensor:
    """The conv as w masked taps over the whole [b, d, l] (a compiled block fuses them into one
    kernel); tap k reads input t + k - (w-1), dropped when it lies in another document."""
    w, l = weight.shape[-1], seq_idx.shape[1]
    docs = torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=1)  # the carried-in state: first doc
    y = bias[None, :, None].to(padded.dtype) if bias is not None else torch.zeros((), dtype=padded.dtype)
    for k in range(w):
        same = (docs[:, k:k + l] == seq_idx)[:, None].to(padded.dtype)
        y = y + padded[:, :, k:k + l] * weight[:, k, None].to(padded.dtype) * same
    return y


def _recompute_after_starts(y: Tensor, padded: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor,
                            cache: dict | None = None) -> Tensor:
    """Only the w-1 outputs from each document start reach back into the previous document: those
    few are recomputed with the taps outside their document dropped (cuDNN's conv does the rest;
    one sync for the indices instead of w masked passes over the whole [b, d, l]). The indices
    and tap masks depend on the documents alone: with `cache`, one sync per batch, not per layer.
    The taps are gathered by index and the outputs overwritten in place, in y's dtype: gathering
    from an `unfold` view (its backward fills a zero tensor w times the input) and an out-of-place
    `index_put` (a copy of y, promoted to fp32 under CUDA autocast) more than doubled the conv's
    forward + backward (CPU profile); the masked 1B mamba2 step ran at 0.84x the plain one."""
    w = weight.shape[-1]
    key = ("conv_taps", w, tuple(seq_idx.shape))
    found = cache.get(key) if cache is not None else None
    if found is None:
        starts = F.pad(seq_idx[:, 1:] != seq_idx[:, :-1], (1, 0))  # [b, l], True where a document starts
        reach = F.pad(starts, (w - 2, 0)).unfold(1, w - 1, 1).any(-1)  # a start among the last w-1 positions
        rows, t = reach.nonzero(as_tuple=True)  # each affected output once
        docs = torch.cat([seq_idx[:, :1].expand(-1, w - 1), seq_idx], dim=1)  # the carried-in state: first doc
        cols = t[:, None] + torch.arange(w, device=t.device)  # [n, w]: output t reads padded t .. t+w-1
        found = rows, t, cols, docs[rows[:, None], cols] == seq_idx[rows, t][:, None]  # [n, w]: taps inside
        if cache is not None:
            cache[key] = found
    rows, t, cols, inside = found
    taps = padded[rows[:, None], :, cols].to(y.dtype)  # [n, w, d]; y's dtype, as the conv's under autocast
    fixed = (taps * (inside[..., None] * weight.t()).to(y.dtype)).sum(1)  # [n, d]; CUDA autocast sums in fp32
    if bias is not None:
        fixed = fixed + bias.to(fixed.dtype)
    y[rows, :, t] = fixed.to(y.dtype)
    return y


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None = None,
                  seq_idx: Tensor | None = None, cache: dict | None = None) -> Tensor:
    """Dispatching conv: causal-conv1d's CUDA kernel (a custom op, see library.py) when installed
    (no carried state), else the reference. The kernel takes `seq_idx` (int32) only in channel-last
    layout (x.stride(1) == 1)."""
    if not (wants_fast_kernel(x) and state is None and has_causal_conv1d()):
        return causal_conv1d_reference(x, weight, bias, state, seq_idx, cache)
    if seq_idx is not None:
        if x.stride(1) != 1:
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        seq_idx = seq_idx.to(torch.int32).contiguous()
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
