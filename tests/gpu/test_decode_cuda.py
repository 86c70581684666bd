"""The CUDA-graph decode step against the eager static step and the full forward. CUDA only."""

import pytest
import torch

from pretrain.model import build_model
from pretrain.model.decode import Decoder
from pretrain.model.ops import attention_reference, reference_kernels
from pretrain.model.ops.decode_attention import decode_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def decode(model, tokens, prompt_len, graph, span_step=8):
    dec = Decoder(model, tokens.shape[0], tokens.shape[1], cuda_graph=graph, span_step=span_step)
    with reference_kernels():
        out = [dec.prefill(tokens[:, :prompt_len])]
    out += [dec.step(tokens[:, i:i + 1]) for i in range(prompt_len, tokens.shape[1] - 1)]
    spans = len({dec.span(n) for n in range(prompt_len + 1, tokens.shape[1])})
    if graph and model.config.moe is None:
        assert len(dec.graphs) == spans and dec.graph_error is None
    elif graph:  # the MoE's bincount synchronises with the host: capture fails, the steps run eagerly
        assert not dec.graphs and "captur" in dec.graph_error
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("arch", ["llama", "swa", "mamba2", "inter_hybrid", "intra_hybrid", "hybrid_moe"])
def test_graph_decode_equals_eager_and_full_forward_fp32(arch):
    torch.manual_seed(0)
    model = build_model(arch, "tiny", device="cuda").eval()
    tokens = torch.randint(0, 512, (2, 45), device="cuda")
    with torch.no_grad():
        with reference_kernels():  # the oracle (and no Triton JIT for the prefills)
            full = model(tokens)[:, 22:-1]
        graphed, eager = decode(model, tokens, 23, True), decode(model, tokens, 23, False)
    assert ((graphed - full).abs().max() / full.abs().max()).item() < 1e-4
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


def test_graph_decode_1b_bf16_matches_eager():
    """Real shapes, bf16 weights, spans crossed: the replayed graphs compute what the eager steps
    compute. The graph run is fed the eager run's greedy tokens (no divergence after a near tie)."""
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "1b", device="cuda").to(torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (4, 300), device="cuda")
    with torch.no_grad():
        eager = Decoder(model, 4, 364, cuda_graph=False, span_step=32)
        with reference_kernels():  # the prefill is not under test (and needs no Triton JIT so)
            want, tokens = [eager.prefill(prompt)], []
        for _ in range(63):
            tokens.append(want[-1].argmax(-1, keepdim=True))
            want.append(eager.step(tokens[-1]))
        graphed = Decoder(model, 4, 364, cuda_graph=True, span_step=32)
        with reference_kernels():
            got = [graphed.prefill(prompt)]
        got += [graphed.step(t) for t in tokens]
    assert len(graphed.graphs) == len({graphed.span(n) for n in range(301, 364)}) == 3 and graphed.graph_error is None
    got, want = torch.stack(got, 1).float(), torch.stack(want, 1).float()
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_decode_attention_bf16_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, 32, 1, 64, device="cuda", generator=g, dtype=torch.bfloat16)
    k, v = (torch.randn(4, 8, 4096, 64, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(2))
    k_pos = torch.arange(4096, device="cuda")
    q_pos = torch.tensor([4000], device="cuda")
    kc, vc = (t.unflatten(2, (16, 256)).permute(2, 0, 1, 3, 4).contiguous() for t in (k, v))  # StaticKV layout
    got = decode_attention(q, kc, vc, q_pos, k_pos)
    want = attention_reference(q.double(), k.double(), v.double(), q_pos, k_pos)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("arch, attention", [("llama", "split_k"), ("llama", "compiled"), ("mamba2", "split_k"),
                                             ("intra_hybrid", "split_k"), ("intra_hybrid", "compiled")])
def test_compiled_graph_decode_equals_eager_graph(arch, attention):
    """Decoder(compile=True) on CUDA: the compiled blocks captured in the CUDA graphs (one per span,
    each after its own warm-up) with the attention read between them (the eager split-K kernel, or
    compiled apart) compute what the eager graphs compute, and the full forward."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(arch, "tiny", device="cuda").eval()
    tokens = torch.randint(0, 512, (2, 45), device="cuda")
    with torch.no_grad():
        with reference_kernels():
            full = model(tokens)[:, 22:-1]
        eager = decode(model, tokens, 23, True)
        torch._dynamo.reset()  # Dynamo's cache is per code object: an earlier test's compilation could serve
        counters.clear()
        dec = Decoder(model, 2, 45, cuda_graph=True, span_step=8, compile=True, attention=attention)
        with reference_kernels():
            got = [dec.prefill(tokens[:, :23])]
        got += [dec.step(tokens[:, i:i + 1]) for i in range(23, 44)]
    compiled_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert compiled_graphs > 0, "the compiled decode step compiled nothing"  # else the test compares eager to eager
    assert dec.graph_error is None and len(dec.graphs) == len({dec.span(n) for n in range(24, 45)})
    got = torch.stack(got, dim=1)
    torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4)
    assert ((got - full).abs().max() / full.abs().max()).item() < 1e-4


def test_ssm_state_update_kernel_matches_reference():
    """mamba-ssm's one-token update (in place, fp32 state) against the PyTorch step, 1B shapes, bf16."""
    from pretrain.model.ops.library import has_state_update
    from pretrain.model.ops.ssd import ssd_step, ssd_step_reference

    assert has_state_update(), "mamba-ssm's selective_state_update failed to import"
    g = torch.Generator(device="cuda").manual_seed(0)
    b, h, p, n = 4, 32, 64, 128
    x = torch.randn(b, 1, h, p, device="cuda", generator=g).bfloat16()
    B, C = (torch.randn(b, 1, 1, n, device="cuda", generator=g).bfloat16() for _ in range(2))
    dt = torch.rand(b, 1, h, device="cuda", generator=g) * 0.1
    A = -torch.rand(h, device="cuda", generator=g)
    state = torch.randn(b, h, p, n, device="cuda", generator=g)
    want_y, want_state = ssd_step_reference(x, dt, A, B, C, state)
    y, new_state = ssd_step(x, dt, A, B, C, state)
    assert new_state is state  # updated in place
    torch.testing.assert_close(new_state, want_state, rtol=1e-4, atol=1e-4)
    assert ((y.float() - want_y.float()).norm() / want_y.float().norm()).item() < 1e-2
