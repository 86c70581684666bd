"""Experimental variants of conv_silu_backward_pre (device A/B only)."""
import triton
import triton.language as tl

from pretrain.model.ops.conv_triton_kernels import pre_activation, tap_ok, tile


@triton.jit
def bwd_pre_nodw(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dpre_ptr,
                 L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    """Lower bound: dpre only, no weight-gradient sums."""
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


@triton.jit
def bwd_pre_loop(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dpre_ptr,
                 dw_ptr, db_ptr, L, D, W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
                 BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr):
    """STEPS tiles along l per program, tap products summed in registers, one reduction at the end
    (W <= 4)."""
    batch = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    x_ptr += batch * x_batch
    doc_ptr += batch * L
    a0 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    a1 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    a2 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    a3 = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    ab = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for s in range(STEPS):
        t = (tl.program_id(1).to(tl.int64) * STEPS + s) * BLOCK_L + tl.arange(0, BLOCK_L)
        pre = pre_activation(x_ptr, x_row, w_ptr, b_ptr, doc_ptr, t, c, L, D, W, HAS_BIAS, HAS_DOC, BLOCK_L, BLOCK_D)
        sig = tl.sigmoid(pre)
        dpre = tile(dy_ptr + batch * dy_batch, dy_row, t, c, t < L, D) * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + batch * L * D + t[:, None] * D + c[None, :], dpre.to(dpre_ptr.dtype.element_ty),
                 mask=(t < L)[:, None] & (c < D)[None, :])
        ab += dpre
        src = t - (W - 1)
        a0 += dpre * tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D)
        if W > 1:
            src = t + 1 - (W - 1)
            a1 += dpre * tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D)
        if W > 2:
            src = t + 2 - (W - 1)
            a2 += dpre * tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D)
        if W > 3:
            src = t + 3 - (W - 1)
            a3 += dpre * tile(x_ptr, x_row, src, c, tap_ok(doc_ptr, src, t, L, HAS_DOC), D)
    part = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * D
    tl.store(dw_ptr + (part + c) * W, tl.sum(a0, 0), mask=c < D)
    if W > 1:
        tl.store(dw_ptr + (part + c) * W + 1, tl.sum(a1, 0), mask=c < D)
    if W > 2:
        tl.store(dw_ptr + (part + c) * W + 2, tl.sum(a2, 0), mask=c < D)
    if W > 3:
        tl.store(dw_ptr + (part + c) * W + 3, tl.sum(a3, 0), mask=c < D)
    if HAS_BIAS:
        tl.store(db_ptr + part + c, tl.sum(ab, 0), mask=c < D)


@triton.jit
def taps3d(x_ptr, x_row, doc_ptr, t, c, k, L, D, W: tl.constexpr, HAS_DOC: tl.constexpr):
    """[BLOCK_L, W_P2, BLOCK_D]: input at t + k - (W-1) for each tap k (0 outside / other document)."""
    src = t[:, None] + k[None, :] - (W - 1)
    ok = (src >= 0) & (src < L) & (t < L)[:, None] & (k < W)[None, :]
    if HAS_DOC:
        ok = ok & (tl.load(doc_ptr + src, mask=ok, other=-1) == tl.load(doc_ptr + t, mask=t < L, other=-2)[:, None])
    return tl.load(x_ptr + src[:, :, None] * x_row + c[None, None, :], mask=ok[:, :, None] & (c < D)[None, None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def bwd_pre_3d(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, dy_ptr, dy_batch, dy_row, dpre_ptr,
               dw_ptr, db_ptr, L, D, W: tl.constexpr, W_P2: tl.constexpr, HAS_BIAS: tl.constexpr,
               HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, STEPS: tl.constexpr):
    """Taps as a tensor dimension: each tile's inputs loaded once for the pre-activation and the
    weight-gradient products; STEPS tiles per program, one reduction at the end; any W."""
    batch = tl.program_id(2).to(tl.int64)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, W_P2)
    x_ptr += batch * x_batch
    doc_ptr += batch * L
    wt = tl.load(w_ptr + c[None, :] * W + k[:, None], mask=(k < W)[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
    bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_L, W_P2, BLOCK_D), dtype=tl.float32)
    ab = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for s in range(STEPS):
        t = (tl.program_id(1).to(tl.int64) * STEPS + s) * BLOCK_L + tl.arange(0, BLOCK_L)
        xs = taps3d(x_ptr, x_row, doc_ptr, t, c, k, L, D, W, HAS_DOC)
        pre = tl.sum(xs * wt[None, :, :], 1) + bias[None, :]
        sig = tl.sigmoid(pre)
        dpre = tile(dy_ptr + batch * dy_batch, dy_row, t, c, t < L, D) * sig * (1.0 + pre * (1.0 - sig))
        tl.store(dpre_ptr + batch * L * D + t[:, None] * D + c[None, :], dpre.to(dpre_ptr.dtype.element_ty),
                 mask=(t < L)[:, None] & (c < D)[None, :])
        ab += dpre
        acc += dpre[:, None, :] * xs
    part = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)).to(tl.int64) * D
    tl.store(dw_ptr + (part + c[None, :]) * W + k[:, None], tl.sum(acc, 0), mask=(k < W)[:, None] & (c < D)[None, :])
    if HAS_BIAS:
        tl.store(db_ptr + part + c, tl.sum(ab, 0), mask=c < D)


@triton.jit
def fwd_3d(x_ptr, x_batch, x_row, w_ptr, b_ptr, doc_ptr, y_ptr, L, D, W: tl.constexpr, W_P2: tl.constexpr,
           HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    batch = tl.program_id(2).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L)
    c = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, W_P2)
    wt = tl.load(w_ptr + c[None, :] * W + k[:, None], mask=(k < W)[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
    xs = taps3d(x_ptr + batch * x_batch, x_row, doc_ptr + batch * L, t, c, k, L, D, W, HAS_DOC)
    pre = tl.sum(xs * wt[None, :, :], 1)
    if HAS_BIAS:
        pre += tl.load(b_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
    y = pre * tl.sigmoid(pre)
    tl.store(y_ptr + batch * L * D + t[:, None] * D + c[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(t < L)[:, None] & (c < D)[None, :])
