"""The CUDA-graph decode step against the eager static step and the full forward. CUDA only."""

import pytest
import torch

from pretrain.model import build_model
from pretrain.model.decode import Decoder
from pretrain.model.ops import attention_reference, reference_kernels
from pretrain.model.ops.decode_attention import decode_attention
from pretrain.model.ops.decode_attention_triton import decode_attention_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def decode(model, tokens, prompt_len, graph, span_step=8, attention=None):
    dec = Decoder(model, tokens.shape[0], tokens.shape[1], cuda_graph=graph, span_step=span_step, attention=attention)
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


@pytest.mark.parametrize("kernel", [decode_attention, decode_attention_triton])
@pytest.mark.parametrize("heads, kv, dq, dv, window", [(32, 8, 64, 64, None), (16, 4, 72, 144, None),
                                                       (32, 8, 64, 64, 1000)])
def test_decode_attention_bf16_matches_reference(kernel, heads, kv, dq, dv, window):
    """1B llama's and the intra-hybrid's head shapes, a sliding window with sinks, bf16 caches in the
    StaticKV layout: both kernels against the fp64 attention."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(4, heads, 1, dq, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(4, kv, 4096, dq, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(4, kv, 4096, dv, device="cuda", generator=g, dtype=torch.bfloat16)
    k_pos = torch.arange(4096, device="cuda")
    q_pos = torch.tensor([4000], device="cuda")
    kc, vc = (t.unflatten(2, (16, 256)).permute(2, 0, 1, 3, 4).contiguous() for t in (k, v))  # StaticKV layout
    got = kernel(q, kc, vc, q_pos, k_pos, window, 4)
    want = attention_reference(q.double(), k.double(), v.double(), q_pos, k_pos, window, 4)
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("arch, attention", [("llama", "triton"), ("llama", "split_k"), ("llama", "compiled"),
                                             ("swa", "triton"), ("mamba2", "triton"), ("intra_hybrid", "triton"),
                                             ("intra_hybrid", "compiled")])
def test_compiled_graph_decode_equals_eager_graph(arch, attention):
    """Decoder(compile=True) on CUDA: the compiled blocks captured in the CUDA graphs (one per span,
    each after its own warm-up) with the attention read between them (our Triton kernels, the eager
    split-K form, or compiled apart) compute what the eager graphs on the split-K read compute, and
    the full forward."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(arch, "tiny", device="cuda").eval()
    tokens = torch.randint(0, 512, (2, 45), device="cuda")
    with torch.no_grad():
        with reference_kernels():
            full = model(tokens)[:, 22:-1]
        eager = decode(model, tokens, 23, True, attention="split_k")  # the PyTorch read: an independent oracle
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


@pytest.mark.parametrize("arch", ["mamba2", "intra_hybrid"])
def test_growing_cache_generate_equals_static_on_cuda(arch):
    """generate(static_cache=False) (the dict states tensor parallelism and pipelines decode with: the
    prefill leaves them as strided slices) through the CUDA decode kernels, against the static
    decoder's tokens and logits."""
    torch.manual_seed(0)
    model = build_model(arch, "tiny", device="cuda").eval()
    prompt = torch.randint(0, 512, (3, 21), device="cuda")
    with torch.no_grad():
        static, static_logits = model.generate(prompt, 12, return_logits=True)
        dynamic, dynamic_logits = model.generate(prompt, 12, return_logits=True, static_cache=False)
    assert torch.equal(static, dynamic)
    torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-4, atol=1e-4)


def test_decoder_default_read_follows_the_kernel_switch_and_dtype():
    model = build_model("llama", "tiny", device="cuda").eval()
    assert Decoder(model, 1, 8).attention == "triton"
    with reference_kernels():
        assert Decoder(model, 1, 8).attention == "split_k"
    model = model.double()
    assert Decoder(model, 1, 8).attention == "split_k"  # the Triton read computes in fp32
    with pytest.raises(ValueError, match="computes in fp32"):
        Decoder(model, 1, 8, attention="triton")


@pytest.mark.parametrize("heads, head_dim, external_bias", [(32, 128, True), (16, 144, False)])
def test_mamba2_step_kernels_match_reference(heads, head_dim, external_bias):
    """Our conv + SSM step kernels at the 1B Mamba2 and intra-hybrid shapes, bf16 activations, fp32
    weights and SSM state, xbc and dt slices of the projection's rows: y and both states (updated in
    place) against the PyTorch step at the same precision (the conv's output rounded to bf16 in both)."""
    from pretrain.model.ops.mamba2_step import mamba2_step, mamba2_step_reference

    g = torch.Generator(device="cuda").manual_seed(0)
    b, n, w = 4, 128, 4
    conv_dim = heads * head_dim + 2 * n
    rows = torch.randn(b, 4096 + conv_dim + heads, device="cuda", generator=g).bfloat16()
    xbc, dt = rows[:, 4096:4096 + conv_dim], rows[:, 4096 + conv_dim:]
    conv_state = torch.randn(b, conv_dim, w - 1, device="cuda", generator=g).bfloat16()
    weight = torch.randn(conv_dim, w, device="cuda", generator=g) * 0.5
    bias = torch.randn(conv_dim, device="cuda", generator=g) if external_bias else None
    dt_bias = torch.rand(heads, device="cuda", generator=g) * 4 - 6
    A_log, D = torch.randn(heads, device="cuda", generator=g), torch.randn(heads, device="cuda", generator=g)
    ssm = torch.randn(b, heads, head_dim, n, device="cuda", generator=g)
    inputs = (xbc, dt, conv_state, weight, bias, dt_bias, A_log, D, ssm)
    want_y, want_conv, want_ssm = mamba2_step_reference(*inputs, head_dim)
    got_conv, got_ssm = conv_state.clone(), ssm.clone()
    y, conv_out, ssm_out = mamba2_step(xbc, dt, got_conv, weight, bias, dt_bias, A_log, D, got_ssm, head_dim)
    assert conv_out is got_conv and ssm_out is got_ssm  # updated in place
    assert torch.equal(got_conv, want_conv)
    torch.testing.assert_close(got_ssm, want_ssm, rtol=1e-5, atol=1e-5)
    assert y.dtype == torch.bfloat16 and ((y.float() - want_y.float()).norm() / want_y.float().norm()).item() < 1e-2


def test_captured_greedy_steps_choose_the_argmax_of_their_logits():
    """1B llama in bf16 (vocabulary 128,256), CUDA graphs: the tokens the greedy graphs choose
    (`greedy_step`, plain generate) equal those of the logit graphs' path (`return_logits`), which
    are the argmax of the logits it returns."""
    torch.manual_seed(0)
    model = build_model("llama", "1b", device="cuda").to(torch.bfloat16).eval()
    prompt = torch.randint(0, model.config.vocab_size, (4, 64), device="cuda")
    with torch.no_grad():
        tokens, logits = model.generate(prompt, 40, return_logits=True)
        greedy = model.generate(prompt, 40)
    assert torch.equal(tokens[:, 64:], logits.argmax(-1))
    assert torch.equal(greedy, tokens)


@pytest.mark.parametrize("compile", [False, True])
def test_greedy_graphs_choose_the_argmax_of_the_logit_graphs(compile):
    """intra_hybrid with a 5,000-token vocabulary (five groups of `greedy_tokens`' first stage, the
    last padded), bf16, CUDA graphs, the step eager or compiled: the tokens the greedy graphs choose
    (`greedy_step`) are the argmax of the logits that the logit graphs (`step`) return for the same
    inputs, each decoder keeping graphs of its own kind only."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny", device="cuda", vocab_size=5000).to(torch.bfloat16).eval()
    prompt = torch.randint(0, 5000, (4, 40), device="cuda")
    torch._dynamo.reset()  # Dynamo's cache is per code object: an earlier test's compilation could serve
    counters.clear()
    with torch.no_grad():
        logit_dec, greedy_dec = (Decoder(model, 4, 80, cuda_graph=True, span_step=16, compile=compile) for _ in "ab")
        with reference_kernels():
            logits = [logit_dec.prefill(prompt)]
            greedy_dec.prefill(prompt)
        chosen = []
        for _ in range(39):
            token = logits[-1].argmax(-1, keepdim=True)
            chosen.append(greedy_dec.greedy_step(token))
            logits.append(logit_dec.step(token))
    compiled_graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert compiled_graphs > 0 or not compile, "the compiled step compiled nothing"  # else it ran eagerly
    spans = {logit_dec.span(n) for n in range(41, 80)}
    assert logit_dec.graph_error is None and set(logit_dec.graphs) == {(s, False) for s in spans}
    assert greedy_dec.graph_error is None and set(greedy_dec.graphs) == {(s, True) for s in spans}
    assert torch.equal(torch.cat(chosen, 1), torch.stack(logits[1:], 1).argmax(-1))
