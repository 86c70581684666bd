"""The Triton kernels of `conv_triton` (see there). A module of their own: Triton resolves the helpers
a kernel calls among its module's globals, and this module imports triton, which the rest of the
package must not need."""

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
def pre_activation(x_ptr, x_row, w_ptr, b_ptr, doc_ptr, t, c, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
                   HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """conv(x) + bias at positions t [BLOCK_L] and channels c [BLOCK_D], in fp32."""
    cmask = c < D
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(W):
        src = t + (k - (W - 1))
        ok = tap_ok(doc_ptr, src, t, L, HAS_DOC)
        xk = tl.load(x_ptr + src[:, None] * x_row + c[None, :], mask=ok[:, None] & cmask[None, :], other=0.0)
        wk = tl.load(w_ptr + c * W + k, mask=cmask, other=0.0)
        acc += xk.to(tl.float32) * wk.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_silu_forward(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, y_ptr, L, D, W: tl.constexpr,
                      HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    t = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    doc_ptr += batch * L
    pre = pre_activation(x_ptr + batch * x_batch, x_row, w_ptr, b_ptr, doc_ptr, t, c, L, D, W, HAS_BIAS,
                         HAS_DOC, BLOCK_L, BLOCK_D)
    y = pre * tl.sigmoid(pre)
    out = y_ptr + batch * L * D + t[:, None] * D + c[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(t < L)[:, None] & (c < D)[None, :])


@triton.jit
def conv_silu_backward(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dx_ptr,
                       dw_ptr, db_ptr, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
                       BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    s = tl.program_id(0).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    doc_ptr += batch * L
    x_ptr += batch * x_batch
    dy_ptr += batch * dy_batch
    dx = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for j in tl.static_range(W):  # the output at u = s + j read input s through tap k = W-1-j
        u = s + j
        pre = pre_activation(x_ptr, x_row, w_ptr, b_ptr, doc_ptr, u, c, L, D, W, HAS_BIAS, HAS_DOC, BLOCK_L,
                             BLOCK_D)
        sig = tl.sigmoid(pre)
        dy = tl.load(dy_ptr + u[:, None] * dy_row + c[None, :], mask=(u < L)[:, None] & cmask[None, :],
                     other=0.0)
        dpre = dy.to(tl.float32) * sig * (1.0 + pre * (1.0 - sig))  # d SiLU(pre), 0 past the end
        ok = tap_ok(doc_ptr, s, u, L, HAS_DOC)
        wk = tl.load(w_ptr + c * W + (W - 1 - j), mask=cmask, other=0.0).to(tl.float32)
        dx += tl.where(ok[:, None], dpre, 0.0) * wk[None, :]
        if j == 0:  # the program's own outputs: their taps' weight and bias gradients
            part = (tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)).to(tl.int64) * D
            for k in tl.static_range(W):
                src = s + (k - (W - 1))
                tap = tap_ok(doc_ptr, src, s, L, HAS_DOC)
                xk = tl.load(x_ptr + src[:, None] * x_row + c[None, :], mask=tap[:, None] & cmask[None, :],
                             other=0.0)
                tl.store(dw_ptr + (part + c) * W + k, tl.sum(dpre * xk.to(tl.float32), 0), mask=cmask)
            if HAS_BIAS:
                tl.store(db_ptr + part + c, tl.sum(dpre, 0), mask=cmask)
    out = dx_ptr + batch * L * D + s[:, None] * D + c[None, :]
    tl.store(out, dx.to(dx_ptr.dtype.element_ty), mask=(s < L)[:, None] & cmask[None, :])
