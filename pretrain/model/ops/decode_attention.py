"""Attention of a few queries over a static KV cache, masked by the slots' key positions.

Grouped-query heads are folded into the query rows (K/V are never repeated per query head), so one
query costs one read of the cache as two batched matmuls and a softmax over [b, kv, rep * lq, S]:
the shapes depend only on the attended span S, never on the context length, so nothing is
re-planned per step (cuDNN SDPA re-plans for every new key length) and a CUDA graph can replay it.
Reference: `attention_reference` (ops/attention.py).
"""

from __future__ import annotations

import math

from torch import Tensor

from pretrain.model.ops.attention import attention_mask
from pretrain.model.ops.precision import wide


def decode_attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                     window: int | None = None, n_sink: int = 0) -> Tensor:
    """q [b, h, lq, dq], k [b, kv, S, dq], v [b, kv, S, dv], q_pos [lq], k_pos [S] -> [b, h, lq, dv].
    Scores in the inputs' dtype (fp32 accumulation on GPU), softmax in fp32."""
    b, h, lq, dq = q.shape
    kv = k.shape[1]
    qg = (q * (1 / math.sqrt(dq))).reshape(b, kv, (h // kv) * lq, dq)  # query head j uses KV head j // rep
    scores = wide(qg @ k.transpose(-1, -2)).unflatten(2, (h // kv, lq))  # [b, kv, rep, lq, S]
    scores = scores.masked_fill(~attention_mask(q_pos, k_pos, window, n_sink), float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).flatten(2, 3)
    return (probs @ v).reshape(b, h, lq, v.shape[-1])
