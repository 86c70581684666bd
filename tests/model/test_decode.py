"""Static-cache decoding against the full forward (every position) and the dynamic cache."""

import pytest
import torch

from pretrain.accounting import cache_elements
from pretrain.model import build_model
from pretrain.model.decode import Decoder
from pretrain.model.lm import STOP_EVERY
from pretrain.model.ops import attention_reference
from pretrain.model.ops.decode_attention import compiled_decode_attention, decode_attention, decode_attention_fused
from pretrain.model.static_cache import EMPTY, SSMState, StaticCache, StaticKV

ARCHS = ["llama", "swa", "mamba2", "inter_hybrid", "intra_hybrid", "hybrid_moe"]


def decode_all(model, tokens, prompt_len, span_step=8):
    """Logits at positions prompt_len-1 .. l-2 from the static decoder fed `tokens` [b, l]."""
    dec = Decoder(model, tokens.shape[0], tokens.shape[1], span_step=span_step)
    out = [dec.prefill(tokens[:, :prompt_len])]
    out += [dec.step(tokens[:, i:i + 1]) for i in range(prompt_len, tokens.shape[1] - 1)]
    return torch.stack(out, dim=1), dec


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("arch", ARCHS)
def test_decode_equals_full_forward_at_every_position(arch, dtype, tol):
    """Tiny SWA: window 16 + 4 sinks, 45 tokens (the ring wraps twice); spans of 8 slots, so
    steps also attend to empty slots of a partly filled span."""
    torch.manual_seed(0)
    model = build_model(arch, "tiny").eval().to(dtype)
    tokens = torch.randint(0, 512, (2, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        for prompt_len in (1, 23):  # decode from one token (every position is a step) and after a prefill
            got, _ = decode_all(model, tokens, prompt_len)
            want = full[:, prompt_len - 1:-1]
            err = ((got - want).abs().max() / want.abs().max()).item()
            assert err < tol, (prompt_len, err)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_static_generate_equals_dynamic(arch):
    torch.manual_seed(0)
    model = build_model(arch, "tiny").eval()
    prompt = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(2))
    static, static_logits = model.generate(prompt, 30, return_logits=True)
    dynamic, dynamic_logits = model.generate(prompt, 30, return_logits=True, static_cache=False)
    assert torch.equal(static, dynamic)
    torch.testing.assert_close(static_logits, dynamic_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("static_cache", [True, False])
def test_stop_ends_generation_at_its_check_with_the_same_tokens(static_cache):
    """`stop` sees the new tokens every STOP_EVERY and ends the loop where it says so: the tokens
    are those of the full generation, cut there (the caller, e.g. generate_until, needs no rerun)."""
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny").eval()
    prompt = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(3))
    full = model.generate(prompt, 50, static_cache=static_cache)
    seen = []
    out, logits = model.generate(prompt, 50, static_cache=static_cache, return_logits=True,
                                 stop=lambda new: seen.append(new.clone()) or new.shape[1] >= 2 * STOP_EVERY)
    assert [s.shape[1] for s in seen] == [STOP_EVERY, 2 * STOP_EVERY]
    assert torch.equal(seen[-1], full[:, 7:7 + 2 * STOP_EVERY])
    assert torch.equal(out, full[:, :7 + 2 * STOP_EVERY]) and logits.shape[1] == 2 * STOP_EVERY
    assert torch.equal(model.generate(prompt, 50, static_cache=static_cache, stop=lambda new: False), full)


@pytest.mark.parametrize("static_cache", [True, False])
def test_eos_pads_each_row_after_its_first_eos_and_ends_once_every_row_has(static_cache):
    """Rows decode independently, so with `eos_id` each row is its generation without one up to
    its first EOS, then EOS; the loop ends at the first check where every row has ended."""
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny").eval()
    prompt = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(3))
    free = model.generate(prompt, 50, static_cache=static_cache)[:, 7:]
    common = set(free[0].tolist()) & set(free[1].tolist()) - set(free[2].tolist())
    eos = min(common)  # made by rows 0 and 1, never by row 2
    is_eos = free == eos
    want = free.masked_fill(is_eos.cumsum(1) - is_eos.int() > 0, eos)  # EOS after each row's first
    assert not torch.equal(want, free)
    got = model.generate(prompt, 50, static_cache=static_cache, eos_id=eos)
    assert torch.equal(got[:, :7], prompt) and torch.equal(got[:, 7:], want)  # row 2 runs to the end
    two = model.generate(prompt[:2], 50, static_cache=static_cache, eos_id=eos)
    ended = int(is_eos[:2].int().argmax(1).max()) + 1  # new tokens until both rows have ended
    assert ended <= STOP_EVERY and torch.equal(two[:, 7:], want[:2, :STOP_EVERY])


@pytest.mark.parametrize("eos_id", [-1, 512, 3.0, True])
def test_an_eos_id_outside_the_vocabulary_is_refused(eos_id):
    model = build_model("llama", "tiny").eval()
    with pytest.raises(ValueError, match="eos_id must be None or a token id in \\[0, 512\\)"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4, eos_id=eos_id)


def test_intra_value_sharing_decodes():
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny", pattern="MHM", intra={"value_sharing": True}).eval().double()
    tokens = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        got, dec = decode_all(model, tokens, 5)
        assert (got - model(tokens)[:, 4:-1]).abs().max() < 1e-12
    attn = model.blocks["1"].mixer.attn
    packed_rows = {s.packed.shape[0] for s in dec.cache.states() if isinstance(s, StaticKV)}
    assert packed_rows == {attn.q_proj.weight.shape[0] + attn.k_proj.weight.shape[0]}  # no V rows: V is shared


@pytest.mark.parametrize("arch", ["llama", "swa", "mamba2", "intra_hybrid"])
def test_cache_bytes_match_accounting(arch):
    """Occupied bytes (counted from the slots' positions) are what `pretrain.accounting` predicts at
    every length; the allocation is fixed (SWA: window + sinks slots)."""
    model = build_model(arch, "tiny").eval()
    tokens = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        _, dec = decode_all(model, tokens, 10)
    assert dec.cache.used_bytes() == 2 * 4 * cache_elements(model.config, 59)
    if arch == "swa":
        cfg = model.config
        assert {s.capacity for s in dec.cache.states()} == {64, cfg.window + cfg.n_sink}  # whole chunks of 8
    fresh = Decoder(model, 2, 60, span_step=8)
    fresh.cache.pretend_length(37)
    assert fresh.cache.used_bytes() == 2 * 4 * cache_elements(model.config, 37)
    assert fresh.cache.allocated_bytes() == dec.cache.allocated_bytes()


def test_decode_attention_matches_reference():
    """GQA folded into rows, sliding window with sinks, empty slots masked by position."""
    g = torch.Generator().manual_seed(0)
    b, h, kv, s, d, dv = 2, 6, 2, 24, 8, 12
    q = torch.randn(b, h, 3, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv, s, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv, s, dv, generator=g, dtype=torch.float64)
    k_pos = torch.randperm(s, generator=g) + 10
    k_pos[5] = EMPTY
    q_pos = torch.tensor([28, 29, 33])
    for window, sinks in ((None, 0), (9, 12)):
        keep = k_pos != EMPTY
        want = attention_reference(q, k[:, :, keep], v[:, :, keep], q_pos, k_pos[keep], window, sinks)
        chunked = (t.unflatten(2, (s // 4, 4)).permute(2, 0, 1, 3, 4).contiguous() for t in (k, v))  # StaticKV layout
        chunked = list(chunked)
        for fn in (decode_attention, decode_attention_fused):  # the second runs compiled in decoding
            assert (fn(q, *chunked, q_pos, k_pos, window, sinks) - want).abs().max() < 1e-12


def test_decoder_errors_are_clear():
    model = build_model("llama", "tiny").eval()
    dec = Decoder(model, 1, 8)
    with pytest.raises(ValueError, match="exceeds max_len"):
        dec.prefill(torch.zeros(1, 9, dtype=torch.long))
    dec.prefill(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cache is full"):
        dec.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="prefill runs once"):
        dec.prefill(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        Decoder(model, 1, 8, cuda_graph=True)
    with pytest.raises(ValueError, match="attention must be one of triton, split_k, compiled"):
        Decoder(model, 1, 8, attention="flash")
    with pytest.raises(ValueError, match="attention='triton' needs the model on a CUDA device"):
        Decoder(model, 1, 8, attention="triton")
    wrong_dtype = Decoder(model, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="allocated for torch.float32"):
        wrong_dtype.prefill(torch.zeros(1, 2, dtype=torch.long))


def test_ssm_states_accumulate_in_fp32_whatever_the_activations():
    """The static cache keeps K/V and conv states at the activations' width and the SSM state in
    fp32 (fp64 in fp64 runs): a bf16 state would round the scan at every token."""
    model = build_model("intra_hybrid", "tiny")
    for dtype, state_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                               (torch.float64, torch.float64)):
        cache = StaticCache(model, 1, 8, dtype, torch.device("cpu"))
        ssm = [s for s in cache.states() if isinstance(s, SSMState)]
        kv = [s for s in cache.states() if isinstance(s, StaticKV)]
        assert ssm and kv
        assert all(s.buffers["ssm"].dtype == state_dtype and s.buffers["conv"].dtype == dtype for s in ssm)
        assert all(s.k.dtype == s.v.dtype == dtype for s in kv)


def test_decoder_decodes_with_the_weights_at_prefill():
    """The packed projections and Mamba2 convs are taken at prefill: weights changed between
    building a Decoder and its prefill (an optimizer step in place, a `.data` swap) are the ones it
    decodes with, and changes after it (the conv weights here) are not."""
    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny").double()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5))
    dec = Decoder(model, 1, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.loss(prompt, prompt).backward()
    opt.step()
    mixer = next(b.mixer for b in model.blocks.values() if hasattr(b.mixer, "attn"))
    mixer.attn.q_proj.weight.data = mixer.attn.q_proj.weight.data * 1.5
    full = model(prompt)
    logits = dec.prefill(prompt[:, :4])
    mixer.ssm.conv_x.weight.data = mixer.ssm.conv_x.weight.data * 2  # after the prefill: not decoded with
    step = dec.step(prompt[:, 4:])
    assert (logits - full[:, 3]).abs().max().item() < 1e-9
    assert (step - full[:, 4]).abs().max().item() < 1e-9


@pytest.mark.slow  # Inductor on 2 busy cores: ~10 s with its cache warm, ~40 s cold
def test_compiled_step_equals_eager_and_full_forward():
    """Decoder(compile=True) on a Mamba2 block and an intra-hybrid block (its global attention
    branch, its Mamba2 branch), with either attention read between the compiled blocks (eager
    split-K, or compiled apart), steps crossing spans of 8 slots from 2 chunks on: nothing compiles
    after the first step (the compiled attention takes any chunk count), and the compiled steps'
    logits equal the eager steps' and the full forward's."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model("intra_hybrid", "tiny", pattern="MH").eval()
    tokens = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(3))
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        full = model(tokens)[:, 8:-1]
        eager, _ = decode_all(model, tokens, 9)
        for attention, fn in (("split_k", decode_attention), ("compiled", compiled_decode_attention)):
            before = counters["stats"]["unique_graphs"]
            dec = Decoder(model, 2, 40, span_step=8, compile=True, attention=attention)
            assert {s.decode_fn for s in dec.cache.states() if isinstance(s, StaticKV)} == {fn}
            got = [dec.prefill(tokens[:, :9]), dec.step(tokens[:, 9:10])]  # spans of 16 slots: 2 chunks
            compiled = counters["stats"]["unique_graphs"]
            got += [dec.step(tokens[:, i:i + 1]) for i in range(10, 39)]  # spans of 16, 24, 32, 40
            assert compiled > before and counters["stats"]["unique_graphs"] == compiled, attention
            got = torch.stack(got, dim=1)
            torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
            assert ((got - full).abs().max() / full.abs().max()).item() < 1e-5, attention
    torch._dynamo.reset()


def test_conv_and_ssm_steps_match_references():
    """The one-token conv (a fused dot product) against the conv with that state; the one-token SSM
    update against the chunked scan from the same initial state."""
    from pretrain.model.ops import causal_conv1d_reference, causal_conv1d_step, ssd_scan_reference
    from pretrain.model.ops.ssd import ssd_step

    g = torch.Generator().manual_seed(0)
    x, state = torch.randn(2, 6, 1, generator=g), torch.randn(2, 6, 3, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    y, new_state = causal_conv1d_step(x, weight, bias, state)
    torch.testing.assert_close(y, causal_conv1d_reference(x, weight, bias, state), rtol=1e-6, atol=1e-6)
    assert torch.equal(new_state, torch.cat([state, x], dim=-1)[..., 1:])
    b, h, p, n = 2, 4, 3, 5
    xs = torch.randn(b, 1, h, p, generator=g)
    B, C = torch.randn(b, 1, 2, n, generator=g), torch.randn(b, 1, 2, n, generator=g)
    dt, A, s0 = torch.rand(b, 1, h, generator=g), -torch.rand(h, generator=g), torch.randn(b, h, p, n, generator=g)
    y, s1 = ssd_step(xs, dt, A, B, C, s0.clone())
    want_y, want_s = ssd_scan_reference(xs, dt, A, B, C, 4, s0)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, want_s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "intra_hybrid"])
def test_greedy_steps_choose_the_argmax_of_their_logits(arch):
    """generate's greedy path takes the step's own choice (`Decoder.greedy_step`): the same tokens as
    the logit path (`return_logits`), whose tokens are the argmax of the logits it returns."""
    torch.manual_seed(0)
    model = build_model(arch, "tiny").eval()
    prompt = torch.randint(0, 512, (3, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        tokens, logits = model.generate(prompt, 30, return_logits=True)
        greedy = model.generate(prompt, 30)
    assert torch.equal(tokens[:, 21:], logits.argmax(-1))
    assert torch.equal(greedy, tokens)
