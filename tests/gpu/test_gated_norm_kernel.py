"""Our Triton gated RMSNorm (ops/gated_norm_triton.py) against `gated_rms_norm_reference` in fp64:
values and the gradients of y, z and weight, with z a column slice of wider rows (the Mamba2
projection's layout), one group and several, the dtypes the trainer runs (bf16 everything, bf16
activations with fp32 weights under autocast, fp32); its custom op under opcheck and compiled.
CUDA only (skipped on CI); the kernels are also checked on CPU under TRITON_INTERPRET=1."""

import pytest
import torch

from pretrain.model.ops import gated_rms_norm, gated_rms_norm_reference, reference_kernels
from gpu_helpers import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def norm_case(dtype, weight_dtype, b: int = 2, l: int = 1500, d: int = 4096, extra: int = 40):
    g = torch.Generator(device="cuda").manual_seed(0)
    y = torch.randn(b, l, d, device="cuda", generator=g, dtype=dtype)
    z = torch.randn(b, l, d + extra, device="cuda", generator=g, dtype=dtype)[..., extra:]
    w = (torch.rand(d, device="cuda", generator=g) + 0.5).to(weight_dtype)
    dout = torch.randn(b, l, d, device="cuda", generator=g, dtype=weight_dtype)
    return y, z, w, dout


def values_and_grads(norm, y, z, w, dout, groups, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (y, z, w)]
    out = norm(*leaves, 1e-5, groups)
    out.backward(dout.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("dtype,weight_dtype,tol", [(torch.float32, torch.float32, 1e-5),
                                                    (torch.bfloat16, torch.bfloat16, 1e-2),
                                                    (torch.bfloat16, torch.float32, 1e-2)])
@pytest.mark.parametrize("groups", [1, 4])
def test_triton_gated_norm_matches_fp64_reference(dtype, weight_dtype, tol, groups):
    y, z, w, dout = norm_case(dtype, weight_dtype)
    got, got_grads = values_and_grads(gated_rms_norm, y, z, w, dout, groups)
    want, want_grads = values_and_grads(gated_rms_norm_reference, y, z, w, dout, groups, torch.float64)
    assert got.dtype == weight_dtype and [t.dtype for t in got_grads] == [dtype, dtype, weight_dtype]
    assert rel(got, want) < tol, rel(got, want)
    for name, a, b in zip(("y", "z", "weight"), got_grads, want_grads):
        assert rel(a, b) < tol, (name, rel(a, b))


def test_triton_gated_norm_compiled_matches_eager_reference():
    """Compiled (the op traced whole, z's padded rows kept) against the eager reference, bf16."""
    y, z, w, dout = norm_case(torch.bfloat16, torch.bfloat16, l=1100)
    got, got_grads = values_and_grads(torch.compile(gated_rms_norm, fullgraph=True), y, z, w, dout, 1)
    with reference_kernels():
        want, want_grads = values_and_grads(gated_rms_norm, y, z, w, dout, 1)
    assert rel(got, want) < 1e-2 and all(rel(a, b) < 1e-2 for a, b in zip(got_grads, want_grads))


def test_triton_gated_norm_opcheck():
    y, z, w, _ = norm_case(torch.bfloat16, torch.float32, l=300, d=256)
    torch.library.opcheck(torch.ops.pretrain.gated_rms_norm.default,
                          (y.requires_grad_(), z.detach().requires_grad_(), w.requires_grad_(), 1e-5, 2))


def test_fp64_takes_the_reference():
    y, z, w, _ = norm_case(torch.float64, torch.float64, l=100, d=64)
    with reference_kernels():
        want = gated_rms_norm(y, z, w, 1e-5, 2)
    assert torch.equal(gated_rms_norm(y, z, w, 1e-5, 2), want)
