"""Causal attention over explicit positions: global, or sliding window with attention sinks.

Keys carry their absolute positions so one mask rule serves training, prefill and decoding from a
trimmed (window + sinks) cache: query i sees key j iff j <= i and (no window, or i - j < window,
or j < n_sink).

Document masking adds per-row document ids [b, l] to queries and keys (positions are then [b, l]
and restart in each document): key j is visible only inside the query's document, and the sinks
are each document's first tokens. On CUDA that runs as FlexAttention with a document mask_mod,
whose block mask skips the blocks between documents (never a dense [l, l] mask at training length).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import CausalBias, causal_lower_right
from torch.utils._python_dispatch import _disable_current_modes

from pretrain.model.ops.dispatch import wants_fast_kernel
from pretrain.model.ops.flex_attention import flex_available, sliding_window_attention
from pretrain.model.ops.precision import wide


def attention_mask(q_pos: Tensor, k_pos: Tensor, window: int | None, n_sink: int,
                   q_doc: Tensor | None = None, k_doc: Tensor | None = None) -> Tensor:
    """Boolean [lq, lk] mask ([b, lq, lk] for [b, l] positions), True where attention is allowed;
    with document ids, only inside the query's document."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    allowed = diff >= 0
    if window is not None:
        allowed &= (diff < window) | (k_pos[..., None, :] < n_sink)
    if q_doc is not None:
        allowed &= q_doc[..., :, None] == k_doc[..., None, :]
    return allowed


def _heads_mask(mask: Tensor) -> Tensor:
    """A [lq, lk] or per-row [b, lq, lk] mask broadcast over heads."""
    return mask[:, None] if mask.dim() == 3 else mask


def expand_kv(k: Tensor, v: Tensor, n_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat each K/V head for its group of query heads (grouped-query attention)."""
    rep = n_heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def attention_reference(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                        window: int | None = None, n_sink: int = 0,
                        q_doc: Tensor | None = None, k_doc: Tensor | None = None) -> Tensor:
    """q [b,h,lq,dq], k [b,kv,lk,dq], v [b,kv,lk,dv] -> [b,h,lq,dv]; explicit softmax in fp32."""
    k, v = expand_kv(k, v, q.shape[1])
    scores = torch.einsum("bhqd,bhkd->bhqk", wide(q), wide(k)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~_heads_mask(attention_mask(q_pos, k_pos, window, n_sink, q_doc, k_doc)), -torch.inf)
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), wide(v)).to(q.dtype)


def causal_suffix_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of the last lq of lk consecutive positions over all lk keys (a context-
    parallel query chunk over the keys up to its end): SDPA's lower-right causal bias, which the
    flash and memory-efficient kernels take, instead of a [lq, lk] mask."""
    lq, lk = q.shape[2], k.shape[2]
    if q.is_cuda and not wants_fast_kernel(q):
        return attention_reference(q, k, v, torch.arange(lk - lq, lk, device=q.device), torch.arange(lk, device=q.device))
    k, v = expand_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_lower_right_causal(lq, lk))


def _lower_right_causal(lq: int, lk: int) -> CausalBias:
    """SDPA's lower-right causal bias, made outside any dispatch mode: the bias is a tensor
    subclass, which selective checkpointing's mode cannot create. It holds no data (two lengths),
    so no mode has anything to see in its creation (eager only; a compiled graph makes it as it is)."""
    if torch.compiler.is_compiling():
        return causal_lower_right(lq, lk)
    with _disable_current_modes():
        return causal_lower_right(lq, lk)


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
    elif lq == lk and q.is_cuda and flex_available():  # training SWA: block-sparse, no dense mask
        return sliding_window_attention(q, k, v, window, n_sink)
    else:
        mask, causal = attention_mask(q_pos, k_pos, window, n_sink), False
    k, v = expand_kv(k, v, q.shape[1])  # explicit: cuDNN attention (fastest on H200) takes no GQA
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


FLEX_MIN_QUERIES = 128  # FlexAttention's block size: shorter queries (decoding) take a small dense mask


@functools.cache
def _compiled_flex() -> tuple[Callable, Callable]:
    """Compiled flex_attention and create_block_mask (the latter never materialises the [lq, lk]
    mask; a new batch's mask_mod closure reuses the compiled code)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)


# FlexAttention's kernel options (document mask and SWA), in one place; `flex_kernel_options` puts
# them on top of the wide-value tiles below. None keeps torch's own per-GPU choice, already tuned
# for Hopper (sm90, bf16): forward BLOCK_M/N 128/128, 4 warps, 3 stages at head_dim 64 (128/64, 8
# warps at 128); backward 64/128, 8 warps, 3 stages. TMA loads are off by default on CUDA.
# benchmarks/document_masking.py times other sets (--flex-options) against it on the H200: change
# this only from such a measurement.
FLEX_KERNEL_OPTIONS: dict | None = None
# torch picks the backward tiles from the query/key head dim alone. With wider values (the 1B
# intra-hybrid: 72 for q/k, 144 for v, padded to 128 and 256) its sm90 choice for 16-bit inputs
# needs 248 KB of shared memory, over the H200's 227 KB, and the backward fails to compile. For
# those, the tiles torch itself picks at head dim 256, which fit any value width up to 256 (they
# pin max-autotune's candidates too). fp32 keeps torch's own, smaller choice.
WIDE_VALUE_KERNEL_OPTIONS = {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64,
                             "bwd_num_stages": 2, "bwd_num_warps": 4}


def flex_kernel_options(qk_head_dim: int, v_head_dim: int, dtype: torch.dtype) -> dict | None:
    """FLEX_KERNEL_OPTIONS, on top of the wide-value backward tiles when 16-bit values are wider than
    the queries and keys past 128 (where torch's choice runs out of shared memory)."""
    if dtype.itemsize == 2 and v_head_dim > max(qk_head_dim, 128):
        return {**WIDE_VALUE_KERNEL_OPTIONS, **(FLEX_KERNEL_OPTIONS or {})}
    return FLEX_KERNEL_OPTIONS


def document_mask_mod(q_pos: Tensor, k_pos: Tensor, q_doc: Tensor, k_doc: Tensor, window: int | None,
                      n_sink: int) -> Callable:
    """`attention_mask`'s rule with documents as a FlexAttention mask_mod. When the keys are the
    queries' own tokens (`k_doc is q_doc`: training without CP or cache) in-document causality is
    the index order, so the mask reads one document id per side (and key positions only for the
    sinks) instead of four gathers: cheaper on the blocks that straddle a boundary."""
    if k_doc is q_doc and k_pos is q_pos:
        def self_mask_mod(b, h, qi, ki):
            same = (q_doc[b, qi] == q_doc[b, ki]) & (qi >= ki)
            if window is None:
                return same
            return same & ((qi - ki < window) | (q_pos[b, ki] < n_sink))
        return self_mask_mod

    def mask_mod(b, h, qi, ki):
        same = (q_doc[b, qi] == k_doc[b, ki]) & (q_pos[b, qi] >= k_pos[b, ki])
        if window is None:
            return same
        return same & ((q_pos[b, qi] - k_pos[b, ki] < window) | (k_pos[b, ki] < n_sink))
    return mask_mod


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, q_doc: Tensor,
                            k_doc: Tensor, window: int | None, n_sink: int, block_masks: dict | None = None,
                            compiled: bool = True) -> Tensor:
    """FlexAttention with the document mask; the block mask (which skips the blocks between
    documents) is built once per shape and mask in `block_masks` (a batch's PackedDocs cache), by
    the compiled create_block_mask (no [lq, lk] mask in memory)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    attend, make_mask = _compiled_flex() if compiled else (flex_attention, create_block_mask)
    b, lq, lk = q.shape[0], q.shape[2], k.shape[2]
    key = ("flex", window, n_sink, lq, lk, q.device)
    block_mask = block_masks.get(key) if block_masks is not None else None
    if block_mask is None:
        block_mask = make_mask(document_mask_mod(q_pos, k_pos, q_doc, k_doc, window, n_sink), b, None, lq, lk,
                               device=q.device)
        if block_masks is not None:
            block_masks[key] = block_mask
    return attend(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1],
                  kernel_options=flex_kernel_options(q.shape[-1], v.shape[-1], q.dtype))


def document_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, q_doc: Tensor,
                       k_doc: Tensor, window: int | None = None, n_sink: int = 0,
                       block_masks: dict | None = None) -> Tensor:
    """Attention within documents: positions and document ids [b, l]. FlexAttention on CUDA for
    training and prefill; SDPA with the (small) mask for decoding and on CPU."""
    if q.is_cuda and not wants_fast_kernel(q):
        return attention_reference(q, k, v, q_pos, k_pos, window, n_sink, q_doc, k_doc)
    if q.is_cuda and q.shape[2] >= FLEX_MIN_QUERIES:
        return flex_document_attention(q, k, v, q_pos, k_pos, q_doc, k_doc, window, n_sink, block_masks)
    mask = _heads_mask(attention_mask(q_pos, k_pos, window, n_sink, q_doc, k_doc))
    k, v = expand_kv(k, v, q.shape[1])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
