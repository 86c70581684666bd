"""`decode_attention`'s contract as two Triton kernels (flash-decoding): a program per cache chunk,
batch row and KV head computes its chunk's softmax partials (running max, sum, unnormalised output),
then one program per output row combines the chunks. Two launches per layer and step where the
split-K PyTorch form launches ~20 (matmuls, the mask, reductions, casts), each a few microseconds
even replayed from a CUDA graph: on the H200 they were most of an attention layer's decode time.
A program per chunk read in blocks of 64 slots (4 warps, 3 stages) was the best overall of 54
configurations at the 1B llama and intra-hybrid shapes, 2K and 8K slots, on the H200 (a program per
64 slots: up to 1.7x slower at 8K; benchmarks/results/h200_2026-12-03/attn_micro.json).
`decode_attention` (ops/decode_attention.py) is the reference (tests/gpu on CUDA, tests/kernels in
Triton's CPU interpreter).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _kernels():
    from pretrain.model.ops import decode_attention_triton_kernels  # imports triton: only when a kernel runs

    return decode_attention_triton_kernels


def _pow2(n: int, least: int = 16) -> int:
    """The power-of-two block holding n, at least `least` (tl.dot's smallest tile side)."""
    from triton import next_power_of_2

    return max(least, next_power_of_2(n))


def decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor,
                            window: int | None = None, n_sink: int = 0) -> Tensor:
    """q [b, h, lq, dq] (any strides with contiguous channels), k [C, b, kv, c, dq], v [C, b, kv, c, dv]
    (contiguous), q_pos [lq], k_pos [C * c] -> [b, h, lq, dv] in v's dtype."""
    b, h, lq, dq = q.shape
    n, _, kv, c, dv = v.shape
    rep, rows = h // kv, h // kv * lq
    assert q.stride(-1) == 1 and k.is_contiguous() and v.is_contiguous(), "contiguous channels and caches"
    if torch.float64 in (q.dtype, k.dtype, v.dtype):
        raise ValueError("decode_attention_triton computes in fp32: fp64 inputs take decode_attention")
    m = torch.empty(n, b, kv, rows, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    o = torch.empty(n, b, kv, rows, dv, device=q.device, dtype=torch.float32)
    out = torch.empty(b, h, lq, dv, device=q.device, dtype=v.dtype)
    block_dv = _pow2(dv)
    kernels = _kernels()
    kernels.decode_attention_partial[(n, b * kv)](
        q, q.stride(0), q.stride(1), q.stride(2), k, v, k_pos, q_pos.contiguous(), m, l, o, b, kv, rep, lq, c,
        1 / math.sqrt(dq), window or 0, n_sink, DQ=dq, DV=dv, HAS_WINDOW=window is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", BLOCK_R=_pow2(rows), BLOCK_S=min(64, _pow2(c)),
        BLOCK_DQ=_pow2(dq), BLOCK_DV=block_dv, num_warps=4, num_stages=3)
    kernels.decode_attention_combine[(b * kv * rows,)](
        m, l, o, out, n, b, kv, rep, lq, DV=dv, BLOCK_C=min(32, _pow2(n, 2)), BLOCK_DV=block_dv, num_warps=4)
    return out


def kv_write_triton(cache, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """`StaticKV._write`'s contract in one launch: k [b, kv, l, dq], v [b, kv, l, dv] (channels
    contiguous) into `cache` (a StaticKV) at `positions` [l]. The PyTorch write launched ~6 kernels
    (slot arithmetic, two index_put_ through permuted views, the positions), ~11 us a layer on the H200."""
    b, kv, lq, dq = k.shape
    dv = v.shape[-1]
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "contiguous channels"
    if not lq:
        return
    window = cache.window
    _kernels().kv_write[(b * kv * lq,)](
        k, k.stride(0), k.stride(1), k.stride(2), v, v.stride(0), v.stride(1), v.stride(2), positions.contiguous(),
        cache.k, cache.v, cache.pos, b, kv, lq, cache.chunk, window or 0, cache.n_sink, DQ=dq, DV=dv,
        HAS_WINDOW=window is not None, BLOCK_DQ=_pow2(dq), BLOCK_DV=_pow2(dv), num_warps=1)
