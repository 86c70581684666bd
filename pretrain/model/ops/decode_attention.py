"""Attention of a few queries over a static, chunked KV cache, masked by the slots' key positions.

Split-K: the cache's C chunks of c slots are C * b * kv independent small matmuls (scores, then
probabilities times values), the softmax is taken over all chunks and the chunks' outputs are
summed. A single [rep, S] x [S, d] product per head would leave most of the GPU idle on one long
reduction (cuBLAS picks a GEMV kernel that took ~170 us per layer at any length on the H200).
Grouped-query heads are folded into the query rows (K/V are never repeated per query head). The
shapes depend only on the attended span, never on the context length: nothing is re-planned per
step and a CUDA graph can replay it. Reference: `attention_reference` (ops/attention.py).
"""

from __future__ import annotations

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
