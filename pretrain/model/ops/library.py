"""The GPU kernels as `torch.library` custom ops, so a compiled block traces them as single opaque
nodes (fake kernels give the output shapes) instead of breaking its graph at their Python code.

Each op wraps a kernel package's own forward and backward functions (`register_autograd`) and
returns contiguous tensors, which its fake kernel states (the kernels' own output layouts follow
their inputs' strides, which Inductor may change: the fake must not guess them).
mamba-ssm's Triton SSD scan, causal-conv1d's CUDA conv, our Triton conv, gated norm and Mamba2 decode
step, and `torch._grouped_mm` (with a loop over experts on other devices, so the MoE's
dispatch compiles on CPU too). Whether a package is there is decided once, outside tracing
(`assume_constant_result`), so dynamo never traces an import.
"""

from __future__ import annotations

import functools
import sys
import types

import torch
from torch import Tensor
from torch.library import custom_op, register_autograd, register_fake

from pretrain.model.ops.conv_triton import conv_silu_backward_triton, conv_silu_triton
from pretrain.model.ops.gated_norm_triton import gated_norm_backward_triton, gated_norm_triton
from pretrain.model.ops.grouped_mm import grouped_mm_reference, grouped_mm_weight_grad_reference
from pretrain.model.ops.mamba2_step_triton import mamba2_step_triton

# ---- package lookup ----------------------------------------------------------------------------


@functools.cache
def _mamba_ssd_functions():
    """mamba-ssm's SSD forward / backward functions, or None. mamba_ssm/__init__ imports its compiled
    `selective_scan_cuda` unconditionally; the Triton kernels do not need it, so a placeholder
    module stands in when the CUDA build is absent (see shared/GPU.md)."""
    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    try:
        from mamba_ssm.ops.triton.ssd_combined import _mamba_chunk_scan_combined_bwd, _mamba_chunk_scan_combined_fwd
    except Exception:  # not installed, or an incompatible build: the reference runs
        return None
    return _mamba_chunk_scan_combined_fwd, _mamba_chunk_scan_combined_bwd


@functools.cache
def _causal_conv1d_functions():
    """causal-conv1d's forward / backward functions (versions with `cpp_functions`), or None."""
    try:
        from causal_conv1d.cpp_functions import causal_conv1d_bwd_function, causal_conv1d_fwd_function
    except Exception:  # causal-conv1d is optional (it needs a CUDA build)
        return None
    return causal_conv1d_fwd_function, causal_conv1d_bwd_function


@torch.compiler.assume_constant_result
def has_mamba_ssd() -> bool:
    return _mamba_ssd_functions() is not None


@torch.compiler.assume_constant_result
def has_causal_conv1d() -> bool:
    return _causal_conv1d_functions() is not None


@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def has_triton() -> bool:
    """Triton imports (our own kernels: the conv, the gated norm, the loss, the optimizer step, the
    decode step's attention and Mamba2 update)."""
    return _triton_imports()


def has_grouped_mm_kernel(device_index: int) -> bool:
    """`torch._grouped_mm` runs on this CUDA device (Hopper or newer)."""
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device_index)[0] >= 9


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """Custom ops return tensors, never None: an absent gradient travels as an empty tensor."""
    return t if t is not None else like.new_empty(0)


# ---- SSD scan (mamba-ssm Triton) -----------------------------------------------------------------


@custom_op("pretrain::ssd_scan", mutates_args=(), device_types="cuda")
def ssd_scan_op(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
                initial_state: Tensor | None = None, seq_idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(y [b,l,h,p] in x's dtype, final state [b,h,p,n] fp32); contract of `ssd_scan_reference`.
    `seq_idx` [b,l] int32 (document index per token) stops the state at document boundaries."""
    fwd, _ = _mamba_ssd_functions()
    y, _, _, _, _, final_state, *_ = fwd(x, dt, A, B, C, chunk_size, initial_states=initial_state, seq_idx=seq_idx)
    return y.contiguous(), final_state.float().contiguous()


@register_fake("pretrain::ssd_scan")
def _(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None):
    b, _, h, p = x.shape
    return x.new_empty(x.shape), x.new_empty(b, h, p, B.shape[-1], dtype=torch.float32)


@custom_op("pretrain::ssd_scan_backward", mutates_args=(), device_types="cuda")
def ssd_scan_backward_op(dy: Tensor, dfinal: Tensor | None, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                         y: Tensor, chunk_size: int, initial_state: Tensor | None,
                         seq_idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, dt, A, B, C, initial state or empty) in their inputs' dtypes."""
    _, bwd = _mamba_ssd_functions()
    dx, ddt, dA, dB, dC, _, _, _, dinit = bwd(dy, x, dt, A, B, C, y, chunk_size, initial_states=initial_state,
                                              dfinal_states=dfinal, seq_idx=seq_idx)
    grads = [g.to(t.dtype).contiguous() for g, t in zip((dx, ddt, dA, dB, dC), (x, dt, A, B, C))]
    dinit = dinit.to(initial_state.dtype).contiguous() if initial_state is not None else None
    return (*grads, _or_empty(dinit, x))


@register_fake("pretrain::ssd_scan_backward")
def _(dy, dfinal, x, dt, A, B, C, y, chunk_size, initial_state, seq_idx):
    dinit = initial_state.new_empty(initial_state.shape) if initial_state is not None else x.new_empty(0)
    return (*(t.new_empty(t.shape) for t in (x, dt, A, B, C)), dinit)


def _ssd_setup(ctx, inputs, output) -> None:
    x, dt, A, B, C, chunk_size, initial_state, seq_idx = inputs
    ctx.chunk_size, ctx.has_initial = chunk_size, initial_state is not None
    ctx.save_for_backward(x, dt, A, B, C, output[0], initial_state, seq_idx)


def _ssd_backward(ctx, dy: Tensor, dfinal: Tensor | None):
    x, dt, A, B, C, y, initial_state, seq_idx = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dinit = ssd_scan_backward_op(dy.contiguous(), dfinal, x, dt, A, B, C, y, ctx.chunk_size,
                                                      initial_state, seq_idx)
    return dx, ddt, dA, dB, dC, None, dinit if ctx.has_initial else None, None


register_autograd("pretrain::ssd_scan", _ssd_backward, setup_context=_ssd_setup)


# The kernels take any row stride: compiled, the input may keep the padded rows Inductor gives the
# projection's output (a custom op's default, exact eager strides, would copy it, twice a layer).
_ANY_ROW_STRIDE = (torch.Tag.needs_fixed_stride_order,)


# ---- Mamba2's one-token decode step (our Triton kernels, mamba2_step_triton.py) ----------------------


@custom_op("pretrain::mamba2_step", mutates_args=("conv_state", "ssm_state"), device_types="cuda",
           tags=_ANY_ROW_STRIDE)
def mamba2_step_op(xbc: Tensor, dt: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None,
                   dt_bias: Tensor, A_log: Tensor, D: Tensor, ssm_state: Tensor, head_dim: int) -> Tensor:
    """The conv and SSM step of `mamba2_step_reference`, both states updated in place; y [b, h * p]
    in xbc's dtype. xbc and dt may be column slices of the projection's rows."""
    return mamba2_step_triton(xbc, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, head_dim)


@register_fake("pretrain::mamba2_step")
def _(xbc, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, ssm_state, head_dim):
    return xbc.new_empty(xbc.shape[0], ssm_state.shape[1] * head_dim)


# ---- causal depthwise conv + SiLU (causal-conv1d CUDA) ---------------------------------------------


@custom_op("pretrain::causal_conv1d", mutates_args=(), device_types="cuda")
def causal_conv1d_op(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None = None) -> Tensor:
    """SiLU(causal depthwise conv(x)) for x [b, d, l], weight [d, w]; no carried-in state.
    `seq_idx` [b, l] int32 (x channel-last then): no tap crosses a document start."""
    fwd, _ = _causal_conv1d_functions()
    return fwd(x, weight, bias, seq_idx, None, None, True).contiguous()


@register_fake("pretrain::causal_conv1d")
def _conv_fake(x, weight, bias, seq_idx=None):
    return x.new_empty(x.shape)


@custom_op("pretrain::causal_conv1d_backward", mutates_args=(), device_types="cuda")
def causal_conv1d_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                              seq_idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    _, bwd = _causal_conv1d_functions()
    dx, dweight, dbias, _ = bwd(x, weight, bias, dy, seq_idx, None, None, None, False, True)
    return dx.contiguous(), dweight.to(weight.dtype).contiguous(), _or_empty(dbias, weight)


@register_fake("pretrain::causal_conv1d_backward")
def _conv_backward_fake(dy, x, weight, bias, seq_idx):
    """Gradients of x, weight and bias (empty without one), as both conv ops' backwards return them."""
    db = bias.new_empty(bias.shape) if bias is not None else weight.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), db


def _conv_setup(ctx, inputs, output) -> None:
    x, weight, bias, seq_idx = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, weight, bias, seq_idx)


def _conv_backward(ctx, dy: Tensor):
    x, weight, bias, seq_idx = ctx.saved_tensors
    # the gradient in x's layout (channel-last when x is, as the kernel reads them alike)
    dy = dy.transpose(1, 2).contiguous().transpose(1, 2) if x.stride(1) == 1 else dy.contiguous()
    dx, dweight, dbias = causal_conv1d_backward_op(dy, x, weight, bias, seq_idx)
    return dx, dweight, dbias if ctx.has_bias else None, None


register_autograd("pretrain::causal_conv1d", _conv_backward, setup_context=_conv_setup)


# ---- causal depthwise conv + SiLU over rows [b, l, d] (our Triton kernels, conv_triton.py) ---------

@custom_op("pretrain::conv_silu_rows", mutates_args=(), device_types="cuda", tags=_ANY_ROW_STRIDE)
def conv_silu_rows_op(x: Tensor, weight: Tensor, bias: Tensor | None, seq_idx: Tensor | None = None) -> Tensor:
    """SiLU(causal depthwise conv) for x [b, l, d] (contiguous channels), weight [d, w]; no carried-in
    state; `seq_idx` [b, l] int32: no tap crosses a document start. [b, l, d] contiguous."""
    return conv_silu_triton(x, weight, bias, seq_idx)


register_fake("pretrain::conv_silu_rows", _conv_fake)


@custom_op("pretrain::conv_silu_rows_backward", mutates_args=(), device_types="cuda", tags=_ANY_ROW_STRIDE)
def conv_silu_rows_backward_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                               seq_idx: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    dx, dweight, dbias = conv_silu_backward_triton(dy, x, weight, bias, seq_idx)
    return dx, dweight, _or_empty(dbias, weight)


register_fake("pretrain::conv_silu_rows_backward", _conv_backward_fake)


def _conv_rows_backward(ctx, dy: Tensor):
    x, weight, bias, seq_idx = ctx.saved_tensors
    dx, dweight, dbias = conv_silu_rows_backward_op(dy, x, weight, bias, seq_idx)
    return dx, dweight, dbias if ctx.has_bias else None, None


register_autograd("pretrain::conv_silu_rows", _conv_rows_backward, setup_context=_conv_setup)


# ---- Mamba2's gated group-local RMSNorm (our Triton kernels, gated_norm_triton.py) -------------------


@custom_op("pretrain::gated_rms_norm", mutates_args=(), device_types="cuda", tags=_ANY_ROW_STRIDE)
def gated_rms_norm_op(y: Tensor, z: Tensor, weight: Tensor, eps: float, n_groups: int) -> tuple[Tensor, Tensor]:
    """(RMSNorm(y * SiLU(z)) * weight over each of n_groups channel groups, in weight's dtype; the
    fp32 rstd [rows, n_groups] the backward reads). y, z [..., d] (z may be a slice of wider rows)."""
    return gated_norm_triton(y, z, weight, eps, n_groups)


@register_fake("pretrain::gated_rms_norm")
def _(y, z, weight, eps, n_groups):
    return y.new_empty(y.shape, dtype=weight.dtype), y.new_empty(y.numel() // y.shape[-1], n_groups,
                                                                 dtype=torch.float32)


@custom_op("pretrain::gated_rms_norm_backward", mutates_args=(), device_types="cuda", tags=_ANY_ROW_STRIDE)
def gated_rms_norm_backward_op(dout: Tensor, y: Tensor, z: Tensor, weight: Tensor,
                               rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return gated_norm_backward_triton(dout, y, z, weight, rstd)


@register_fake("pretrain::gated_rms_norm_backward")
def _(dout, y, z, weight, rstd):
    return y.new_empty(y.shape), z.new_empty(z.shape), weight.new_empty(weight.shape)


def _gated_norm_setup(ctx, inputs, output) -> None:
    y, z, weight, _, _ = inputs
    ctx.save_for_backward(y, z, weight, output[1])


def _gated_norm_backward(ctx, dout: Tensor, _drstd: Tensor | None):
    y, z, weight, rstd = ctx.saved_tensors
    dy, dz, dweight = gated_rms_norm_backward_op(dout, y, z, weight, rstd)
    return dy, dz, dweight, None, None


register_autograd("pretrain::gated_rms_norm", _gated_norm_backward, setup_context=_gated_norm_setup)


# ---- grouped expert matmul -------------------------------------------------------------------------


def _use_kernel(x: Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and has_grouped_mm_kernel(x.device.index or 0)


@custom_op("pretrain::grouped_mm", mutates_args=())
def grouped_mm_op(x: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x sorted by expert times their expert's weight; one kernel on Hopper in bf16."""
    if _use_kernel(x):
        return torch._grouped_mm(x, w, offs=offsets.to(torch.int32))
    return grouped_mm_reference(x, w, offsets)


@register_fake("pretrain::grouped_mm")
def _(x, w, offsets):
    return x.new_empty(x.shape[0], w.shape[-1])


@custom_op("pretrain::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad_op(x: Tensor, dy: Tensor, offsets: Tensor) -> Tensor:
    """The weight gradient of `grouped_mm`: per expert x_e^T dy_e, [e, k, n]."""
    if _use_kernel(x):
        return torch._grouped_mm(x.t(), dy, offs=offsets.to(torch.int32))
    return grouped_mm_weight_grad_reference(x, dy, offsets)


@register_fake("pretrain::grouped_mm_weight_grad")
def _(x, dy, offsets):
    return x.new_empty(offsets.shape[0], x.shape[1], dy.shape[1])


def _gmm_setup(ctx, inputs, output) -> None:
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _gmm_backward(ctx, dy: Tensor):
    x, w, offsets = ctx.saved_tensors
    dy = dy.contiguous()
    # w transposed as a view: the kernel reads either layout, and a transposing copy of the expert
    # stack doubled this GEMM's time (0.94 against 0.43 ms on the H200, 1B hybrid_moe's shape)
    dx = grouped_mm_op(dy, w.transpose(-2, -1), offsets) if ctx.needs_input_grad[0] else None
    dw = grouped_mm_weight_grad_op(x, dy, offsets) if ctx.needs_input_grad[1] else None
    return dx, dw, None


register_autograd("pretrain::grouped_mm", _gmm_backward, setup_context=_gmm_setup)
