"""The Triton kernels of `gated_norm_triton` (see there). A module of their own: it imports triton,
which the rest of the package must not need.

A program owns one normalisation group (`group` channels, padded to BLOCK, a power of two) of a
row at a time, in fp32: g = y * SiLU(z), n = g * rstd, out = n * weight."""

import triton
import triton.language as tl


@triton.jit
def gated_norm_forward(y_ptr, y_row, z_ptr, z_row, w_ptr, out_ptr, rstd_ptr, D, group, eps,
                       BLOCK: tl.constexpr):
    """out = RMSNorm(y * SiLU(z)) * weight for one row (program id 0) and group (program id 1); rstd saved."""
    row, grp = tl.program_id(0).to(tl.int64), tl.program_id(1)
    k = tl.arange(0, BLOCK)
    mask = k < group
    c = grp * group + k
    y = tl.load(y_ptr + row * y_row + c, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + row * z_row + c, mask=mask, other=0.0).to(tl.float32)
    g = y * z * tl.sigmoid(z)
    rstd = 1.0 / tl.sqrt(tl.sum(g * g, 0) / group + eps)
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + c, (g * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row * tl.num_programs(1) + grp, rstd)


@triton.jit
def gated_norm_backward(dout_ptr, dout_row, y_ptr, y_row, z_ptr, z_row, w_ptr, rstd_ptr, dy_ptr, dz_ptr, dw_ptr,
                        rows, D, group, rows_per_program, BLOCK: tl.constexpr):
    """The gradients of y and z for `rows_per_program` rows from program id 0's first, one group
    (program id 1); the weight gradient's sum over those rows, fp32, into row program id 0 of dw."""
    first, grp = tl.program_id(0).to(tl.int64) * rows_per_program, tl.program_id(1)
    k = tl.arange(0, BLOCK)
    mask = k < group
    c = grp * group + k
    w = tl.load(w_ptr + c, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        dout = tl.load(dout_ptr + row * dout_row + c, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + row * y_row + c, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + row * z_row + c, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row * tl.num_programs(1) + grp)
        sig = tl.sigmoid(z)
        gate = z * sig
        n = y * gate * rstd
        dn = dout * w
        dg = rstd * (dn - n * (tl.sum(dn * n, 0) / group))
        tl.store(dy_ptr + row * D + c, (dg * gate).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + row * D + c, (dg * y * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)
        dw += dout * n
    tl.store(dw_ptr + tl.program_id(0).to(tl.int64) * D + c, dw, mask=mask)
