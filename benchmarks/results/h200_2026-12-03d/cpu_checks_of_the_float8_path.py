"""The FP8 grouped expert GEMM's parts on CPU: the power-of-two rowwise quantization, the autograd
function through its reference against fp32, the MoE's FP8 experts (the reference GEMM standing in
for the kernel) against its bf16 experts, and which experts train.fp8 switches. The kernel itself:
tests/gpu/test_grouped_mm_float8_cuda.py."""

import pytest
import torch

from pretrain.model import build_model
from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE
from pretrain.model.ops.grouped_mm import grouped_mm_reference
from pretrain.model.ops.grouped_mm_float8 import E4M3_MAX, grouped_mm_float8, quantize_rows


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_quantization_is_a_power_of_two_per_row_within_e4m3():
    x = torch.randn(64, 96) * torch.logspace(-6, 4, 64)[:, None]
    x[3] = 0
    q, s = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two: exact to undo
    peak = q.float().abs().amax(-1)
    assert bool((peak[s != s[3]] >= E4M3_MAX / 2).all()) and bool((peak <= E4M3_MAX).all())  # each row's range used
    assert q[3].float().abs().max() == 0
    back = q.float() * s[:, None]
    # half an e4m3 step: 2^-4 relative, or half the subnormal step 2^-9 for the row's small entries
    assert bool(((back - x).abs() <= x.abs() * 2**-4 + 2**-10 * s[:, None]).all())


def test_float8_grouped_mm_values_and_gradients_near_fp32():
    """Forward and input gradient in float8 (e4m3 keeps 3 mantissa bits: ~4% relative error on
    random data), the weight gradient in bf16 (~0.4%), zero for the expert without tokens."""
    torch.manual_seed(0)
    counts = torch.tensor([37, 0, 64, 5, 150])
    offsets = counts.cumsum(0)
    x = torch.randn(int(counts.sum()), 64, requires_grad=True)
    w = torch.randn(5, 64, 48, requires_grad=True)
    out = grouped_mm_float8(x, w, offsets)
    ref = grouped_mm_reference(x, w, offsets)
    assert out.dtype == torch.bfloat16
    dy = torch.randn_like(ref)
    (dx, dw), (ref_dx, ref_dw) = torch.autograd.grad(out, (x, w), dy), torch.autograd.grad(ref, (x, w), dy)
    assert 0.01 < rel(out, ref) < 0.06
    assert dx.dtype == dw.dtype == torch.float32
    assert 0.01 < rel(dx, ref_dx) < 0.06
    assert rel(dw, ref_dw) < 0.01
    assert dw[1].abs().max() == 0


def test_moe_fp8_experts_near_bf16_experts(monkeypatch):
    """The whole routed path (pad, the SwiGLU's three GEMMs, unpad, combine) with the reference GEMM
    standing in for the kernel, against the same MoE's bf16 experts."""
    import pretrain.model.moe as moe_module

    torch.manual_seed(0)
    moe = MoE(64, 96, MoEConfig(n_experts=4, top_k=2))
    moe.reset_parameters()
    x = torch.randn(2, 40, 64)
    results = []
    for fp8 in (False, True):
        moe.zero_grad()
        assert moe.experts.enable_float8(16) if fp8 else not moe.experts.float8
        monkeypatch.setattr(moe_module, "float8_grouped_applies", lambda t: fp8)
        xi = x.clone().requires_grad_()
        out = moe(xi)
        out.backward(torch.ones_like(out))
        results.append([out, xi.grad] + [p.grad.clone() for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3)])
    for a, b in zip(*results):
        assert 0.005 < rel(b, a) < 0.08


def test_fp8_switches_the_1b_experts_and_not_the_tiny_ones():
    from parallel.float8 import apply_float8

    for size, want in (("1b", True), ("tiny", False)):
        model = build_model("hybrid_moe", size, device="meta")
        names = apply_float8(model, "rowwise")
        experts = [n for n, m in model.named_modules() if n.endswith("ffn.experts")]
        assert experts and all(model.get_submodule(n).float8 is want for n in experts)
        assert (set(experts) <= set(names)) is want
