"""GPU side of compile and FP8: with the real kernels (mamba-ssm Triton SSD as a custom op,
torch._grouped_mm) every block kind still traces as one graph, the custom ops pass
torch.library.opcheck, a compiled (Inductor) block matches eager, and float8 linears stay close to
bf16. CUDA only (reported as skipped on CI)."""

import copy

import pytest
import torch
import torch._dynamo

from pretrain.model import build_model
from pretrain.model.parallelize import parallelize_hybrid
from gpu_helpers import rel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BLOCKS = {"attention": ("llama", "A"), "swa": ("swa", "S"), "mamba2": ("mamba2", "M"),
          "intra_hybrid": ("intra_hybrid", "H"), "moe": ("hybrid_moe", "M")}


def block_of(kind: str, size: str = "100m", device: str = "cuda") -> torch.nn.Module:
    torch.manual_seed(0)
    arch, symbol = BLOCKS[kind]
    model = build_model(arch, size, device=device, pattern=symbol)
    return model.blocks["0"].to(torch.bfloat16)


@pytest.mark.parametrize("kind", list(BLOCKS))
def test_block_with_gpu_kernels_traces_as_one_graph(kind):
    block = block_of(kind)
    x = torch.randn(2, 1024, block.mixer_norm.weight.shape[0], device="cuda", dtype=torch.bfloat16)
    torch._dynamo.reset()
    report = torch._dynamo.explain(block)(x, torch.arange(1024, device="cuda"))
    assert report.graph_break_count == 0, [str(r.reason)[:300] for r in report.break_reasons]
    assert report.graph_count == 1


def test_custom_ops_opcheck_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, l, h, p, n = 2, 300, 4, 64, 32
    x = torch.randn(b, l, h, p, device="cuda", generator=g, dtype=torch.bfloat16)
    dt = torch.nn.functional.softplus(torch.randn(b, l, h, device="cuda", generator=g) - 2)
    A = -torch.rand(h, device="cuda", generator=g) - 0.1
    B, C = (torch.randn(b, l, 1, n, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    s0 = torch.randn(b, h, p, n, device="cuda", generator=g)
    for t in (x, dt, A, B, C, s0):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.pretrain.ssd_scan.default, (x, dt, A, B, C, 128, s0, None))
    xg = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(4, 256, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    offsets = torch.tensor([16, 16, 40, 64], device="cuda")
    torch.library.opcheck(torch.ops.pretrain.grouped_mm.default, (xg, w, offsets))


def test_grouped_mm_kernel_gradients_match_loop():
    from pretrain.model.ops.grouped_mm import grouped_mm_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(96, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = torch.randn(4, 256, 128, device="cuda", generator=g).bfloat16().requires_grad_()
    offsets = torch.tensor([16, 16, 64, 96], device="cuda")
    dy = torch.randn(96, 128, device="cuda", generator=g).bfloat16()
    out = torch.ops.pretrain.grouped_mm(x, w, offsets)
    grads = torch.autograd.grad(out, (x, w), dy)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = grouped_mm_reference(xr, wr, offsets)
    ref_grads = torch.autograd.grad(ref, (xr, wr), dy.float())
    assert rel(out, ref) < 1e-2
    for a, b in zip(grads, ref_grads):
        assert rel(a, b) < 1e-2


def assert_compiled_matches_eager(module: torch.nn.Module, x: torch.Tensor, *args) -> None:
    """Inductor against eager on module(x, *args), both in x's 16-bit dtype and both measured against
    the module in fp32: the output, x's gradient and every parameter's. A fused kernel keeps its
    intermediates in fp32 where eager rounds every op's output, so the two 16-bit paths differ by their
    roundings (2.4e-2 for a Mamba2 block's conv bias); the compiled one must be within 2e-2 of fp32 plus
    twice eager's own error. A wrong fusion moves a tensor by O(1)."""
    def run(m, fn, inputs):
        m.zero_grad(set_to_none=True)
        xi = inputs.clone().requires_grad_()
        out = fn(xi, *args)
        seeded = torch.Generator(x.device).manual_seed(1)
        out.backward(torch.randn(out.shape, device=x.device, generator=seeded).to(out.dtype))
        return [out, xi.grad] + [p.grad for p in m.parameters() if p.grad is not None]

    fp32 = copy.deepcopy(module).float()
    want = run(fp32, fp32, x.float())
    eager = run(module, module, x)
    torch._dynamo.reset()
    compiled = run(module, torch.compile(module), x)
    assert len(compiled) == len(eager) == len(want) > 2
    for c, e, w in zip(compiled, eager, want):
        assert rel(c, w) < 2e-2 + 2 * rel(e, w), (rel(c, w), rel(e, w))


def test_inductor_block_matches_eager():
    block = block_of("mamba2")
    x = torch.randn(2, 1024, block.mixer_norm.weight.shape[0], device="cuda", dtype=torch.bfloat16)
    assert_compiled_matches_eager(block, x, torch.arange(1024, device="cuda"))


def test_inductor_moe_matches_eager_on_decisive_tokens(device="cuda"):
    """The MoE FFN (router, grouped GEMMs, dispatch) compiled against eager, in bf16, on tokens whose
    top-1 expert wins by a clear margin. A whole Mamba2 + MoE block cannot be compared so: Inductor
    rounds the router's input differently, a few near-tied tokens then pick another expert (5 of
    2,048 on CPU), and their outputs and the experts' gradients move by up to 15%."""
    ffn = block_of("moe", device=device).ffn
    torch.manual_seed(0)
    x = torch.randn(4096, ffn.router.weight.shape[1], device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        scores = torch.sigmoid(x.float() @ ffn.router.weight.float().t()) + ffn.expert_bias
        top2 = scores.topk(2, dim=-1).values
    assert_compiled_matches_eager(ffn, x[top2[:, 0] - top2[:, 1] > 2e-2][None])  # [1, t, d]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_loss_and_grads_close_to_bf16(recipe):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs sm >= 8.9")
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    ref = build_model("llama", "100m", device="cuda", pattern="AA").to(torch.bfloat16)
    fp8 = build_model("llama", "100m", device="cuda", pattern="AA").to(torch.bfloat16)
    fp8.load_state_dict(ref.state_dict())
    parallelize_hybrid(fp8, None, fp8=recipe)
    assert sum(isinstance(m, Float8Linear) for m in fp8.modules()) == 10  # q, o, w1, w2, w3 (k, v: 256 < 512)
    tokens = torch.randint(0, ref.config.vocab_size, (2, 1025), device="cuda")
    losses, grads = [], []
    for m in (ref, fp8):
        loss = m.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in m.parameters()])
    assert abs(losses[1] - losses[0]) < 0.01 * losses[0], losses
    errs = [rel(a, b) for a, b in zip(grads[1], grads[0])]
    # e4m3 keeps 3 mantissa bits (6% spacing): measured on the H200 2026-12-01 (100m dims, one
    # step) max 0.17 / 0.15 (tensorwise / rowwise), median ~0.11-0.14; the loss gap is the real bar
    # (benchmarks/fp8_loss.py over 300 steps)
    assert max(errs) < 0.3 and sorted(errs)[len(errs) // 2] < 0.2, errs


def test_flex_sliding_window_matches_reference_values_and_grads():
    """SWA's CUDA training path (FlexAttention, compiled) against the explicit-softmax reference."""
    from pretrain.model.ops import attention_reference
    from pretrain.model.ops.flex_attention import sliding_window_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    l = 2048 + 100
    q, k, v = (torch.randn(2, h, l, 64, device="cuda", generator=g).bfloat16().requires_grad_() for h in (8, 2, 2))
    pos = torch.arange(l, device="cuda")
    dy = torch.randn(2, 8, l, 64, device="cuda", generator=g).bfloat16()
    out = sliding_window_attention(q, k, v, 512, 4)
    ref = attention_reference(q, k, v, pos, pos, 512, 4)
    assert rel(out, ref) < 1e-2
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy)):
        assert rel(a, b) < 2e-2
