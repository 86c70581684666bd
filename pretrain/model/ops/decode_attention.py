"""Attention of a few queries over a static, chunked KV cache, masked by the slots' key positions.

Split-K: the cache's C chunks of c slots are C * b * kv independent small matmuls (scores, then
probabilities times values), the softmax is taken over all chunks and the chunks' outputs are
summed. A single [rep, S] x [S, d] product per head would leave most of the GPU idle on one long
reduction (cuBLAS picks a GEMV kernel that took ~170 us per layer at any length on the H200).
Grouped-query heads are folded into the query rows (K/V are never repeated per query head). The
shapes depend only on the attended span, never on the context length: nothing is re-planned per
step and a CUDA graph can replay it. Reference: `attention_reference` (ops/attention.py).

`decode_attention_fused` is the same attention written as broadcast products and reductions (no
batched GEMM: cuBLAS's kernels for these [rep, d] x [d, c] batches took ~165 us per layer on the
H200 at any span): eager it would materialise a product d times the cache, so it runs only through
`compiled_decode_attention`, where Inductor turns it into a few memory-bound reduction kernels.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from pretrain.model.ops.attention import attention_mask
from pretrain.model.ops.precision import wide


def decode_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                     window: int | None = None, n_sink: int = 0) -> Tensor:
    """q [b, h, lq, dq], k [C, b, kv, c, dq], v [C, b, kv, c, dv] (contiguous), q_pos [lq],
    k_pos [C * c] -> [b, h, lq, dv]. Scores in the inputs' dtype (fp32 accumulation on GPU),
    softmax in fp32."""
    b, h, lq, dq = q.shape
    n, _, kv, c, dv = v.shape
    rep = h // kv
    qg = (q * (1 / math.sqrt(dq))).reshape(1, b, kv, rep * lq, dq).expand(n, -1, -1, -1, -1)
    scores = torch.bmm(qg.reshape(-1, rep * lq, dq), k.view(-1, c, dq).transpose(1, 2))
    scores = wide(scores).view(n, b, kv, rep, lq, c)
    allowed = attention_mask(q_pos, k_pos, window, n_sink).view(lq, n, c).transpose(0, 1)  # [C, lq, c]
    scores = scores.masked_fill(~allowed[:, None, None, None], float("-inf"))
    top = scores.amax(dim=(0, 5), keepdim=True)
    probs = torch.exp(scores - top)
    out = torch.bmm(probs.to(v.dtype).view(-1, rep * lq, c), v.view(-1, c, dv))
    out = wide(out).view(n, b, kv, rep, lq, dv).sum(0) / probs.sum(dim=(0, 5), keepdim=True)[0]
    return out.to(v.dtype).reshape(b, h, lq, dv)


def decode_attention_fused(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                           window: int | None = None, n_sink: int = 0) -> Tensor:
    """`decode_attention`'s contract, as products and sums for Inductor to fuse (fp32 throughout)."""
    b, h, lq, dq = q.shape
    n, _, kv, c, dv = v.shape
    rep = h // kv
    qg = (wide(q) * (1 / math.sqrt(dq))).reshape(b, kv, rep, lq, 1, dq)
    scores = (qg[None] * wide(k)[:, :, :, None, None]).sum(-1)  # [C, b, kv, rep, lq, c]
    allowed = attention_mask(q_pos, k_pos, window, n_sink).view(lq, n, c).transpose(0, 1)  # [C, lq, c]
    scores = scores.masked_fill(~allowed[:, None, None, None], float("-inf"))
    probs = torch.exp(scores - scores.amax(dim=(0, 5), keepdim=True))
    out = (probs[..., None] * wide(v)[:, :, :, None, None]).sum(dim=(0, 5))  # [b, kv, rep, lq, dv]
    out = out / probs.sum(dim=(0, 5))[..., None]
    return out.to(v.dtype).reshape(b, h, lq, dv)


@functools.cache
def _compiled_fused():
    return torch.compile(decode_attention_fused)


def compiled_decode_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                              window: int | None = None, n_sink: int = 0) -> Tensor:
    """`decode_attention_fused` through torch.compile with the number of chunks dynamic: one
    compilation serves every span (from 2 chunks on; a CUDA-graph decode step warms up before each
    capture, so no kernel is compiled or tuned while capturing). Only that dimension: with every
    size symbolic, a span whose chunk count equals the batch would be guarded equal to it."""
    for t in (k, v, k_pos):
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return _compiled_fused()(q, k, v, q_pos, k_pos, window, n_sink)
