"""Causal attention over explicit positions: global, or sliding window with attention sinks.

Keys carry their absolute positions so one mask rule serves training, prefill and decoding from a
trimmed (window + sinks) cache: query i sees key j iff j <= i and (no window, or i - j < window,
or j < n_sink).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.precision import wide


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, n_sink: int) -> Tensor:
    """Boolean [lq, lk] mask, True where attention is allowed."""
    diff = q_pos[:, None] - k_pos[None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= (diff < window) | (k_pos[None, :] < n_sink)
    return allowed


def expand_kv(k: Tensor, v: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat each K/V head for its group of query heads (grouped-query attention)."""
    rep = n_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                        window: int | None = None, n_sink: int = 0) -> Tensor:
    """q [b,h,lq,dq], k [b,kv,lk,dq], v [b,kv,lk,dv] -> [b,h,lq,dv]; explicit softmax in fp32."""
    k, v = expand_kv(k, v, q.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", wide(q), wide(k)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~attention_mask(q_pos, k_pos, window, n_sink), -torch.inf)
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), wide(v)).to(q.dtype)


def causal_suffix_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last lq of lk consecutive positions over all lk keys (a context-
    parallel query chunk over the keys up to its end): SDPA's lower-right causal bias, which the
    flash and memory-efficient kernels take, instead of a [lq, lk] mask."""
    lq, lk = q.shape[2], k.shape[2]
    if q.is_cuda and not wants_fast_kernel(q):
        return attention_reference(q, k, v, torch.arange(lk - lq, lk, device=q.device), torch.arange(lk, device=q.device))
    k, v = expand_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(lq, lk))


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
              window: int | None = None, n_sink: int = 0) -> Tensor:
    """`scaled_dot_product_attention` (cuDNN / flash on GPU); plain causal when no mask is needed.
    The CPU path is SDPA too (its math backend); `reference_kernels()` forces the explicit softmax."""
    if q.is_cuda and not wants_fast_kernel(q):
        return attention_reference(q, k, v, q_pos, k_pos, window, n_sink)
    lq, lk = q.shape[2], k.shape[2]
    in_window = window is None or lk <= window
    if lq == lk and in_window:  # no cache (training, first prefill): q_pos == k_pos
        mask, causal = None, True
    elif lq == 1 and in_window:  # decoding one token: every cached key is visible
        mask, causal = None, False
    else:
        mask, causal = attention_mask(q_pos, k_pos, window, n_sink), False
    k, v = expand_kv(k, v, q.shape[1])  # explicit: cuDNN attention (fastest on H200) takes no GQA
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
