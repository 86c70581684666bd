"""The Triton kernels of `conv_triton` (see there). A module of their own: Triton resolves the helpers
a kernel calls among its module's globals, and this module imports triton, which the rest of the
package must not need.

Every kernel works on tiles of [BLOCK_L positions, BLOCK_D channels] of one batch row, channel
blocks varying fastest (program id 0), so the programs in flight read whole rows together. The conv
taps are a dimension of their own: `window` loads, for each position of a tile, the W rows it meets
([BLOCK_L, W_P2, BLOCK_D], W padded to a power of two), so one load feeds both the pre-activation
and, in the backward, the weight-gradient products."""

import triton
import triton.language as tl


@triton.jit
def window(ptr, row_stride, doc_ptr, t, rows, c, L, D, W: tl.constexpr, HAS_DOC: tl.constexpr):
    """[BLOCK_L, W_P2, BLOCK_D] fp32: for each position t and tap k, the row rows[t, k] of channels c;
    0 where that row is outside the sequence, in another document than t, or k a padding tap."""
    k = tl.arange(0, rows.shape[1])
    ok = (rows >= 0) & (rows < L) & (t < L)[:, None] & (k < W)[None, :]
    if HAS_DOC:
        ok = ok & (tl.load(doc_ptr + rows, mask=ok, other=-1) == tl.load(doc_ptr + t, mask=t < L, other=-2)[:, None])
    return tl.load(ptr + rows[:, :, None] * row_stride + c[None, None, :],
                   mask=ok[:, :, None] & (c < D)[None, None, :], other=0.0).to(tl.float32)


@triton.jit
def taps(w_ptr, c, D, W: tl.constexpr, W_P2: tl.constexpr):
    """The weight [W_P2, BLOCK_D] of channels c, fp32, 0 at padding taps."""
    k = tl.arange(0, W_P2)
    return tl.load(w_ptr + c[None, :] * W + k[:, None], mask=(k < W)[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def inputs_of(t, W: tl.constexpr, W_P2: tl.constexpr):
    """[BLOCK_L, W_P2]: the input rows t - (W-1) + k each output position t sums over its taps k."""
    return t[:, None] + tl.arange(0, W_P2)[None, :] - (W - 1)


@triton.jit
def rows_tile(ptr, t, c, L, D):
    """Pointers and mask of the [BLOCK_L, BLOCK_D] tile at positions t, channels c of contiguous rows."""
    return ptr + t[:, None] * D + c[None, :], (t < L)[:, None] & (c < D)[None, :]


@triton.jit
def conv_silu_forward(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, y_ptr, L, D, W: tl.constexpr,
                      W_P2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """y = SiLU(conv(x) + bias)."""
    batch = tl.program_id(2).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    xs = window(x_ptr + batch * x_batch, x_row, doc_ptr + batch * L, t, inputs_of(t, W, W_P2), c, L, D, W, HAS_DOC)
    pre = tl.sum(xs * taps(w_ptr, c, D, W, W_P2)[None, :, :], 1)
    if HAS_BIAS:
        pre += tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
    ptrs, mask = rows_tile(y_ptr + batch * L * D, t, c, L, D)
    tl.store(ptrs, (pre * tl.sigmoid(pre)).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def conv_silu_backward_pre(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dpre_ptr,
                           dw_ptr, db_ptr, L, D, steps, W: tl.constexpr, W_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
                           HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dpre = dy * SiLU'(pre), written in x's dtype [b, l, d]; and the weight and bias gradients
    (dpre times each tap's input) summed over the program's `steps` tiles along l into fp32 partials
    [programs over b and l, d, (w)]. The products are summed in registers and reduced once, at the end."""
    batch = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    x_ptr += batch * x_batch
    doc_ptr += batch * L
    weight = taps(w_ptr, c, D, W, W_P2)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_L, W_P2, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for s in range(steps):
        t = (tl.program_id(1).to(tl.int64) * steps + s) * BLOCK_L + tl.arange(0, BLOCK_L)
        xs = window(x_ptr, x_row, doc_ptr, t, inputs_of(t, W, W_P2), c, L, D, W, HAS_DOC)
        pre = tl.sum(xs * weight[None, :, :], 1) + bias[None, :]
        sig = tl.sigmoid(pre)
        dy = tl.load(dy_ptr + batch * dy_batch + t[:, None] * dy_row + c[None, :],
                     mask=(t < L)[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
        dpre = dy * sig * (1.0 + pre * (1.0 - sig))
        ptrs, mask = rows_tile(dpre_ptr + batch * L * D, t, c, L, D)
        tl.store(ptrs, dpre.to(dpre_ptr.dtype.element_ty), mask=mask)
        dw += dpre[:, None, :] * xs
        db += dpre
    part = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * D
    k = tl.arange(0, W_P2)
    tl.store(dw_ptr + (part + c[None, :]) * W + k[:, None], tl.sum(dw, 0), mask=(k < W)[:, None] & (c < D)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part + c, tl.sum(db, 0), mask=c < D)


@triton.jit
def conv_backward_input(dpre_ptr, w_ptr, doc_ptr, dx_ptr, L, D, W: tl.constexpr, W_P2: tl.constexpr,
                        HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """dx at s = sum over taps k of weight[k] * dpre at s + (W-1) - k, the outputs s fed (in its
    document): the forward's conv transposed."""
    batch = tl.program_id(2).to(tl.int64)
    s = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    fed = s[:, None] + (W - 1) - tl.arange(0, W_P2)[None, :]
    dpres = window(dpre_ptr + batch * L * D, D, doc_ptr + batch * L, s, fed, c, L, D, W, HAS_DOC)
    dx = tl.sum(dpres * taps(w_ptr, c, D, W, W_P2)[None, :, :], 1)
    ptrs, mask = rows_tile(dx_ptr + batch * L * D, s, c, L, D)
    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
