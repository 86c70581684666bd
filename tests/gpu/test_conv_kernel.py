"""Our Triton causal conv + SiLU (ops/conv_triton.py) against `causal_conv1d_reference` in fp64:
values and the gradients of x, weight and bias, with and without document ids, in the rows layout
the Mamba2 projection writes (a column slice of a wider tensor), at sizes that are not multiples
of the kernel's tiles. CUDA only (skipped on CI); the kernels were also checked on CPU under
TRITON_INTERPRET=1."""

import pytest
import torch

from pretrain.model.ops import causal_conv1d, causal_conv1d_reference, reference_kernels
from pretrain.model.ops.library import has_causal_conv1d, has_triton
from pretrain.model.packed import PackedDocs
from gpu_helpers import rel
from test_document_masking_cuda import random_starts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def conv_case(dtype, width: int, docs: bool, bias: bool, b: int = 2, l: int = 2000, d: int = 300):
    """x [b, d, l] as the mixer passes it: the transpose of rows [b, l, d] sliced from wider rows."""
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = torch.randn(b, l, d + 40, device="cuda", generator=g, dtype=dtype)[..., 16:16 + d]
    w = torch.randn(d, width, device="cuda", generator=g, dtype=dtype)
    bi = torch.randn(d, device="cuda", generator=g, dtype=dtype) if bias else None
    seq_idx = PackedDocs.from_starts(random_starts(b, l)).doc if docs else None
    grad_out = torch.randn(b, d, l, device="cuda", generator=g, dtype=dtype)
    return rows.transpose(1, 2), w, bi, seq_idx, grad_out


def values_and_grads(conv, x, w, bias, grad_out, dtype=None):
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_() for t in (x, w, bias) if t is not None]
    y = conv(leaves[0], leaves[1], leaves[2] if bias is not None else None)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), [t.grad for t in leaves]


@pytest.mark.skipif(has_causal_conv1d(), reason="causal-conv1d takes the dispatch when installed")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("width,docs,bias", [(4, False, True), (4, True, True), (3, True, False), (2, False, False),
                                             (5, True, True)])
def test_triton_conv_matches_fp64_reference(dtype, tol, width, docs, bias):
    assert has_triton()
    x, w, bi, seq_idx, grad_out = conv_case(dtype, width, docs, bias)
    got, got_grads = values_and_grads(lambda *a: causal_conv1d(*a, None, seq_idx), x, w, bi, grad_out)
    want, want_grads = values_and_grads(lambda *a: causal_conv1d_reference(*a, None, seq_idx), x, w, bi, grad_out,
                                        torch.float64)
    assert got.dtype == dtype and got.stride(1) == 1  # rows layout, as the projection's
    assert rel(got, want) < tol, rel(got, want)
    for name, a, b in zip(("x", "weight", "bias"), got_grads, want_grads):
        assert rel(a, b) < tol, (name, rel(a, b))


@pytest.mark.skipif(has_causal_conv1d(), reason="causal-conv1d takes the dispatch when installed")
def test_triton_conv_compiled_under_autocast_matches_eager_reference():
    """fp32 weights under bf16 autocast (the cast precision): the compiled dispatch casts as autocast
    would, and equals the eager reference (reference_kernels) in value and gradient."""
    x, w, bi, seq_idx, grad_out = conv_case(torch.float32, 4, True, True, l=1100)
    x = x.to(torch.bfloat16)

    def conv(*a):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return causal_conv1d(*a, None, seq_idx)

    got, got_grads = values_and_grads(torch.compile(conv, fullgraph=True), x, w, bi, grad_out)
    with reference_kernels():
        want, want_grads = values_and_grads(conv, x, w, bi, grad_out)
    assert got.dtype == want.dtype == torch.bfloat16
    assert rel(got, want) < 1e-2 and all(rel(a, b) < 1e-2 for a, b in zip(got_grads, want_grads))


@pytest.mark.parametrize("docs,bias", [(True, True), (False, False)])
def test_triton_conv_opcheck(docs, bias):
    x, w, bi, seq_idx, _ = conv_case(torch.bfloat16, 4, docs, bias, l=1100, d=72)
    rows = x.transpose(1, 2).detach().requires_grad_()
    torch.library.opcheck(torch.ops.pretrain.conv_silu_rows.default,
                          (rows, w.requires_grad_(), bi.requires_grad_() if bias else None,
                           seq_idx.to(torch.int32) if docs else None))


def test_fp64_takes_the_reference():
    x, w, bi, seq_idx, _ = conv_case(torch.float64, 4, True, True, l=1100, d=72)
    with reference_kernels():
        want = causal_conv1d(x, w, bi, None, seq_idx)
    assert torch.equal(causal_conv1d(x, w, bi, None, seq_idx), want)
