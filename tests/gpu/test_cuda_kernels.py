"""Fast paths against their references on the same GPU. CUDA only: CI has no GPU, so these are
reported as skipped there and run on the H200 (see docs/benchmarks.md)."""

import pytest
import torch

from pretrain.model import build_model
from pretrain.model.mamba2 import Mamba2
from pretrain.model.ops import (attention, causal_suffix_attention, chunked_cross_entropy, cross_entropy_reference,
                                grouped_mm, reference_kernels, ssd_scan)
from pretrain.model.ops.library import has_mamba_ssd
from gpu_helpers import rel
from ssd_inputs import ssd_inputs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_mamba_ssm_triton_kernel_is_used():
    assert has_mamba_ssd(), "mamba-ssm Triton SSD kernel failed to import"


def test_ssd_triton_matches_reference_fp32():
    x, dt, A, B, C, s0 = ssd_inputs(1000)
    y, s = ssd_scan(x, dt, A, B, C, 256, s0)
    with reference_kernels():
        y_ref, s_ref = ssd_scan(x, dt, A, B, C, 256, s0)
    assert rel(y, y_ref) < 5e-3 and rel(s, s_ref) < 5e-3


def test_mamba2_mixer_1b_dims_bf16_seq8192_output_and_grads():
    torch.manual_seed(0)
    mixer = Mamba2(2048, 32, 128, 128, chunk_size=256).cuda()
    mixer.reset_parameters()
    mixer = mixer.to(torch.bfloat16)
    u = (torch.randn(1, 8192, 2048, device="cuda") * 0.5).to(torch.bfloat16)

    def run():
        x = u.clone().requires_grad_()
        out = mixer(x)
        grad_out = torch.randn_like(out, generator=torch.Generator(device="cuda").manual_seed(1))
        out.backward(grad_out)
        return out.detach(), x.grad.detach()

    out, grad = run()
    with reference_kernels():
        out_ref, grad_ref = run()
    assert rel(out, out_ref) < 1e-2, rel(out, out_ref)
    assert rel(grad, grad_ref) < 1e-2, rel(grad, grad_ref)


@pytest.mark.parametrize("window", [None, 512])
def test_sdpa_matches_reference_bf16(window):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 16, 2048, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 2048, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.arange(2048, device="cuda")
    out = attention(q, k, v, pos, pos, window, 64)
    with reference_kernels():
        ref = attention(q, k, v, pos, pos, window, 64)
    assert rel(out, ref) < 1e-2


def test_causal_suffix_attention_matches_reference_bf16():
    """Context parallel's query chunk (the last 1024 of 3072 positions over all keys) through SDPA's
    lower-right causal bias on the GPU kernels, against the position-masked reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(2, 16, 1024, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(2, 4, 3072, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    out = causal_suffix_attention(q, k, v)
    with reference_kernels():
        ref = causal_suffix_attention(q, k, v)
    assert rel(out, ref) < 1e-2


def test_grouped_mm_matches_reference_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.tensor([700, 0, 1300, 48, 512, 900, 16, 620], device="cuda")
    x = torch.randn(int(counts.sum()), 2048, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(8, 2048, 1024, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    out = grouped_mm(x, w, counts.cumsum(0))
    with reference_kernels():
        ref = grouped_mm(x, w, counts.cumsum(0))
    assert rel(out, ref) < 1e-2


def test_full_1b_intra_hybrid_forward_backward_bf16_seq8192():
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "1b", device="cuda")
    tokens = torch.randint(0, model.config.vocab_size, (1, 8193), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - 11.76) < 1.0  # ~ln(128256) at init
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("setup", ["autocast", "bf16 parameters"])
def test_chunked_cross_entropy_bf16_matches_reference(setup):
    """The chunked loss on its Triton path (default chunks: 4,185 rows, a partial last one; ignored
    rows) against full fp32 logits: under bf16 autocast, and with bf16 parameters and hidden states
    and no autocast (the trainer's one-GPU setup)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(8192, 2048, device="cuda", generator=g)
    w = torch.randn(128256, 2048, device="cuda", generator=g) * 0.02
    t = torch.randint(0, 128256, (8192,), device="cuda", generator=g)
    t[::7] = -100
    if setup == "bf16 parameters":
        h, w = h.bfloat16(), w.bfloat16()
    h.requires_grad_(), w.requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=setup == "autocast"):
        loss = chunked_cross_entropy(h, w, t)
    grads = torch.autograd.grad(loss, (h, w))
    hr, wr = (a.detach().float().requires_grad_() for a in (h, w))
    ref = cross_entropy_reference(hr, wr, t)
    ref_grads = torch.autograd.grad(ref, (hr, wr))
    assert abs(loss.item() - ref.item()) < 1e-2 * ref.item()
    for a, b in zip(grads, ref_grads):
        assert a.dtype == h.dtype and rel(a, b) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_xent_kernel_matches_reference(dtype):
    """The chunked loss's Triton step against its PyTorch reference on the same logits: row losses and
    the gradient it writes over them (vocabulary not a multiple of the kernel's block, ignored rows,
    targets at both ends)."""
    from pretrain.model.ops.softmax_xent_triton import has_triton, softmax_xent_reference, softmax_xent_triton

    assert has_triton()
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(512, 128256, device="cuda", generator=g) * 4).to(dtype)
    t = torch.randint(0, 128256, (512,), device="cuda", generator=g)
    t[::9], t[1], t[2] = -1, 0, 128255
    scale = torch.tensor(1 / 450, device="cuda")
    fast, ref = logits.clone(), logits.clone()
    loss = softmax_xent_triton(fast, t, scale)
    loss_ref = softmax_xent_reference(ref, t, scale)
    assert rel(loss, loss_ref) < 1e-5
    assert rel(fast, ref) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (fast[::9] == 0).all()
    untouched = logits.clone()
    assert rel(softmax_xent_triton(untouched, t, scale, grad=False), loss_ref) < 1e-5
    assert torch.equal(untouched, logits)


def test_grouped_mm_takes_fast_path_under_autocast(monkeypatch):
    """The MoE's input is the fp32 residual stream; under bf16 autocast it must still use
    torch._grouped_mm, not the per-expert loop."""
    import importlib

    gm = importlib.import_module("pretrain.model.ops.grouped_mm")  # the package re-exports the function under this name

    def fail(*args):
        raise AssertionError("reference loop used under autocast")

    from pretrain.model.ops import library

    monkeypatch.setattr(gm, "grouped_mm_reference", fail)
    monkeypatch.setattr(library, "grouped_mm_reference", fail)  # the custom op's non-kernel branch
    x = torch.randn(64, 256, device="cuda")
    w = torch.randn(4, 256, 128, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gm.grouped_mm(x, w, torch.tensor([16, 32, 48, 64], device="cuda"))
    assert out.dtype == torch.bfloat16
