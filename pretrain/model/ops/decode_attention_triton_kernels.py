"""The Triton kernels of `decode_attention_triton` (see there). A module of their own: it imports
triton, which the rest of the package must not need.

Rows: a KV head's query heads times the queries (`rep * lq`, padded to BLOCK_R >= 16 for tl.dot),
the row r being query head `g * rep + r // lq` at query `r % lq`. Scores and the softmax in fp32;
fp32 inputs multiply in full fp32 (`PRECISION` "ieee": Triton's default TF32 would round them to
10-bit mantissas). The head dims are compile-time constants (`DQ`, `DV`): a runtime 72 (the
intra-hybrid's query dim) is not known to be a multiple of 8, so the cache rows' loads could not be
vectorised."""

import triton
import triton.language as tl


@triton.jit
def decode_attention_partial(q_ptr, q_b, q_h, q_l, k_ptr, v_ptr, kpos_ptr, qpos_ptr, m_ptr, l_ptr, o_ptr,
                             B, KV, rep, lq, chunk, scale, window, n_sink, DQ: tl.constexpr, DV: tl.constexpr,
                             HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_S: tl.constexpr, BLOCK_DQ: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One cache chunk (program id 0) of one batch row and KV head (program id 1): the rows' running
    max m, sum of exponentials l and unnormalised output o over the chunk's allowed slots."""
    n, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, g = bg // KV, bg % KV
    r = tl.arange(0, BLOCK_R)
    rows = rep * lq
    head, t = g * rep + r // lq, r % lq
    dqs, dvs = tl.arange(0, BLOCK_DQ), tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * q_b + head[:, None] * q_h + t[:, None] * q_l + dqs[None, :],
                mask=(r[:, None] < rows) & (dqs[None, :] < DQ), other=0.0)
    q_pos = tl.load(qpos_ptr + t, mask=r < rows, other=0)
    cache = (n * B + b) * KV + g  # the chunk's [c, d] matrix of this row and head
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_DV), tl.float32)
    for s0 in range(0, chunk, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        k = tl.load(k_ptr + (cache * chunk + s[:, None]) * DQ + dqs[None, :],
                    mask=(s[:, None] < chunk) & (dqs[None, :] < DQ), other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_R, BLOCK_S]
        k_pos = tl.load(kpos_ptr + n * chunk + s, mask=s < chunk, other=0)
        diff = q_pos[:, None] - k_pos[None, :]
        allowed = (diff >= 0) & (s[None, :] < chunk)
        if HAS_WINDOW:
            allowed = allowed & ((diff < window) | (k_pos[None, :] < n_sink))
        scores = tl.where(allowed, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no allowed slot yet: nothing to rescale
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_ptr + (cache * chunk + s[:, None]) * DV + dvs[None, :],
                    mask=(s[:, None] < chunk) & (dvs[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    part = cache * rows + r  # [C, b, kv, rows]
    tl.store(m_ptr + part, m_i, mask=r < rows)
    tl.store(l_ptr + part, l_i, mask=r < rows)
    tl.store(o_ptr + part[:, None] * DV + dvs[None, :], acc, mask=(r[:, None] < rows) & (dvs[None, :] < DV))


@triton.jit
def decode_attention_combine(m_ptr, l_ptr, o_ptr, out_ptr, C, B, KV, rep, lq, DV: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One output row (program id 0 over b * kv * rows): the C chunks' partials rescaled to their
    common max and summed, the output normalised by the summed exponentials."""
    i = tl.program_id(0).to(tl.int64)
    rows = rep * lq
    bg, r = i // rows, i % rows
    cs, dvs = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_DV)
    top = tl.full((BLOCK_C,), float("-inf"), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        top = tl.maximum(top, tl.load(m_ptr + (c * B * KV + bg) * rows + r, mask=c < C, other=float("-inf")))
    m = tl.max(top, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.zeros((BLOCK_C,), tl.float32)
    num = tl.zeros((BLOCK_C, BLOCK_DV), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cs
        part = (c * B * KV + bg) * rows + r
        w = tl.exp(tl.load(m_ptr + part, mask=c < C, other=float("-inf")) - m)
        den += w * tl.load(l_ptr + part, mask=c < C, other=0.0)
        num += w[:, None] * tl.load(o_ptr + part[:, None] * DV + dvs[None, :],
                                    mask=(c[:, None] < C) & (dvs[None, :] < DV), other=0.0)
    out = tl.sum(num, 0) / tl.sum(den, 0)
    b, g = bg // KV, bg % KV
    row = (b * KV + g) * rep + r // lq  # [b, h] of the output's [b, h, lq, DV]
    tl.store(out_ptr + (row * lq + r % lq) * DV + dvs, out.to(out_ptr.dtype.element_ty), mask=dvs < DV)


@triton.jit
def kv_write(k_ptr, k_b, k_h, k_l, v_ptr, v_b, v_h, v_l, pos_ptr, kc_ptr, vc_ptr, slot_pos_ptr, B, KV, lq, chunk,
             window, n_sink, DQ: tl.constexpr, DV: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_DQ: tl.constexpr,
             BLOCK_DV: tl.constexpr):
    """Token t's key and value of one batch row and KV head (program id 0 over b * kv * lq) into their
    slot of the chunked caches [C, b, kv, c, d]; the first head's program records the slot's position."""
    i = tl.program_id(0).to(tl.int64)
    bg, t = i // lq, i % lq
    b, g = bg // KV, bg % KV
    p = tl.load(pos_ptr + t)
    slot = p
    if HAS_WINDOW:  # sinks keep their slots, the rest a ring of `window` slots after them
        slot = tl.where(p < n_sink, p, n_sink + (p - n_sink) % window)
    row = ((slot // chunk) * B * KV + bg) * chunk + slot % chunk
    dqs, dvs = tl.arange(0, BLOCK_DQ), tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + b * k_b + g * k_h + t * k_l + dqs, mask=dqs < DQ)
    v = tl.load(v_ptr + b * v_b + g * v_h + t * v_l + dvs, mask=dvs < DV)
    tl.store(kc_ptr + row * DQ + dqs, k.to(kc_ptr.dtype.element_ty), mask=dqs < DQ)
    tl.store(vc_ptr + row * DV + dvs, v.to(vc_ptr.dtype.element_ty), mask=dvs < DV)
    if bg == 0:
        tl.store(slot_pos_ptr + slot, p)
