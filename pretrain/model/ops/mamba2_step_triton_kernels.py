"""The Triton kernels of `mamba2_step_triton` (see there). A module of their own: it imports triton,
which the rest of the package must not need. Both update their state in place, in fp32 arithmetic."""

import triton
import triton.language as tl


@triton.jit
def conv_step(x_ptr, x_row, state_ptr, w_ptr, b_ptr, out_ptr, D, W: tl.constexpr, HAS_BIAS: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_W: tl.constexpr):
    """SiLU(conv) of one token for a block of channels (program id 1) of one row (program id 0): the
    window is the state [D, W-1] then x; the state shifts by one in place."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, BLOCK_W)
    mask = c < D
    state = state_ptr + (row * D + c[:, None]) * (W - 1)
    x = tl.load(x_ptr + row * x_row + c, mask=mask, other=0.0)
    past = tl.load(state + j[None, :], mask=mask[:, None] & (j[None, :] < W - 1), other=0.0)
    window = tl.where(j[None, :] == W - 1, x[:, None], past)
    weight = tl.load(w_ptr + c[:, None] * W + j[None, :], mask=mask[:, None] & (j[None, :] < W), other=0.0)
    y = tl.sum(window.to(tl.float32) * weight.to(tl.float32), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + c, (y * tl.sigmoid(y)).to(out_ptr.dtype.element_ty), mask=mask)
    later = tl.load(state + j[None, :] + 1, mask=mask[:, None] & (j[None, :] < W - 2), other=0.0)
    shifted = tl.where(j[None, :] == W - 2, x[:, None], later)
    tl.store(state + j[None, :], shifted, mask=mask[:, None] & (j[None, :] < W - 1))


@triton.jit
def ssm_step(xbc_ptr, dt_ptr, dt_row, dt_bias_ptr, a_log_ptr, d_ptr, state_ptr, y_ptr, H, P, N, heads_per_group,
             conv_dim, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One head (program id 1) and block of its channels (program id 2) of one row (program id 0):
    dt = softplus(dt + dt_bias), state <- exp(dt A) state + dt x B^T in place, y = state C + D x.
    xbc [rows, conv_dim] holds x [H * P], then B and C [groups * N] each."""
    row, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
    p = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pm, nm = p < P, n < N
    xbc = xbc_ptr + row * conv_dim
    g = h // heads_per_group
    x = tl.load(xbc + h * P + p, mask=pm, other=0.0).to(tl.float32)
    b = tl.load(xbc + H * P + g * N + n, mask=nm, other=0.0).to(tl.float32)
    c = tl.load(xbc + H * P + (conv_dim - H * P) // 2 + g * N + n, mask=nm, other=0.0).to(tl.float32)
    v = tl.load(dt_ptr + row * dt_row + h).to(tl.float32) + tl.load(dt_bias_ptr + h).to(tl.float32)
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e  # log1p(e) as log(u) * e / (u - 1): exact to fp32 rounding where e is small (Goldberg)
    dt = tl.where(v > 20.0, v, tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0))))  # F.softplus (threshold 20)
    decay = tl.exp(-dt * tl.exp(tl.load(a_log_ptr + h).to(tl.float32)))
    state = state_ptr + ((row * H + h) * P + p[:, None]) * N + n[None, :]
    s = tl.load(state, mask=pm[:, None] & nm[None, :], other=0.0)
    s = s * decay + (dt * x)[:, None] * b[None, :]
    tl.store(state, s, mask=pm[:, None] & nm[None, :])
    y = tl.sum(s * c[None, :], 1) + tl.load(d_ptr + h).to(tl.float32) * x
    tl.store(y_ptr + row * H * P + h * P + p, y.to(y_ptr.dtype.element_ty), mask=pm)
