"""The Triton kernels of `conv_triton` (see there). A module of their own: Triton resolves the helpers
a kernel calls among its module's globals, and this module imports triton, which the rest of the
package must not need.

Every kernel runs over tiles of [BLOCK_L positions, BLOCK_D channels] of one batch row, channel
blocks varying fastest (program id 0), so the programs in flight read whole rows together."""

import triton
import triton.language as tl


@triton.jit
def tap_ok(doc_ptr, src, dst, L, HAS_DOC: tl.constexpr):
    """Whether input position `src` feeds output position `dst` (both [BLOCK_L]): inside the
    sequence, and in the same document."""
    ok = (src >= 0) & (src < L) & (dst < L)
    if HAS_DOC:
        ok = ok & (tl.load(doc_ptr + src, mask=ok, other=-1) == tl.load(doc_ptr + dst, mask=ok, other=-2))
    return ok


@triton.jit
def tile(ptr, row_stride, t, c, ok, D):
    """The [BLOCK_L, BLOCK_D] tile at rows t, channels c, 0 where `ok` [BLOCK_L] is false, in fp32."""
    return tl.load(ptr + t[:, None] * row_stride + c[None, :], mask=ok[:, None] & (c < D)[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def pre_activation(x_ptr, x_row, w_ptr, b_ptr, doc_ptr, t, c, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """conv(x) + bias at positions t and channels c, in fp32."""
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        src = t + (k - (W - 1))
        wk = tl.load(w_ptr + c * W + k, mask=c < D, other=0.0).to(tl.float32)
        acc += tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D) * wk[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_silu_forward(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, y_ptr, L, D, W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """y = SiLU(conv(x) + bias)."""
    batch = tl.program_id(2).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    pre = pre_activation(x_ptr + batch * x_batch, x_row, w_ptr, b_ptr, doc_ptr + batch * L, t, c, L, D, W,
                         HAS_BIAS, HAS_DOC, BLOCK_L, BLOCK_D)
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + batch * L * D + t[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & (c < D)[None, :])


@triton.jit
def conv_silu_backward_pre(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dpre_ptr,
                           dw_ptr, db_ptr, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
                           BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpre = dy * SiLU'(pre), written in x's dtype [b, l, d], and each program's sums of the weight
    and bias gradients (dpre times each tap's input) into fp32 partials [programs over b and l, d, (w)]."""
    batch = tl.program_id(2).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    x_ptr += batch * x_batch
    doc_ptr += batch * L
    pre = pre_activation(x_ptr, x_row, w_ptr, b_ptr, doc_ptr, t, c, L, D, W, HAS_BIAS, HAS_DOC, BLOCK_L, BLOCK_D)
    sig = tl.sigmoid(pre)
    dpre = tile(dy_ptr + batch * dy_batch, dy_row, t, c, t < L, D) * sig * (1.0 + pre * (1.0 - sig))
    tl.store(dpre_ptr + batch * L * D + t[:, None] * D + c[None, :], dpre.to(dpre_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & (c < D)[None, :])
    part = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * D
    for k in tl.static_range(W):  # the same tiles as the pre-activation's: cache hits
        src = t + (k - (W - 1))
        xk = tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D)
        tl.store(dw_ptr + (part + c) * W + k, tl.sum(dpre * xk, 0), mask=c < D)
    if HAS_BIAS:
        tl.store(db_ptr + part + c, tl.sum(dpre, 0), mask=c < D)


@triton.jit
def conv_backward_input(dpre_ptr, w_ptr, doc_ptr, dx_ptr, L, D, W: tl.constexpr, HAS_DOC: tl.constexpr,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx at s = sum over taps k of weight[k] * dpre at s + (W-1) - k, the outputs s fed (in its
    document): the forward's conv transposed."""
    batch = tl.program_id(2).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dpre_ptr += batch * L * D
    doc_ptr += batch * L
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        u = s + (W - 1 - k)
        wk = tl.load(w_ptr + c * W + k, mask=c < D, other=0.0).to(tl.float32)
        dx += tile(dpre_ptr, D, u, c, tap_ok(doc_ptr, s, u, L, HAS_DOC), D) * wk[None, :]
    tl.store(dx_ptr + batch * L * D + s[:, None] * D + c[None, :], dx.to(dx_ptr.dtype.element_ty),
             mask=(s < L)[:, None] & (c < D)[None, :])
