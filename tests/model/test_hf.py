"""Hugging Face interop with native transformers classes: to_hf / from_hf preserve the function
against transformers' own forward, round-trip exactly, survive save_pretrained -> AutoModelForCausalLM
without a warning from transformers, and send what has no native class to the remote-code export
(tests/model/test_hf_remote.py)."""

import logging

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

from pretrain.model import ARCHS, SIZES, build_model, model_config
from pretrain.hf_remote.modeling_hybrid import HybridForCausalLM
from pretrain.model.hf import NATIVE_ARCHS, from_hf, hf_config, native_refusal, to_hf

SUPPORTED = ("llama", "mamba2", "inter_hybrid")
LENGTHS = (32, 21)  # a multiple of the chunk size (16 tiny, 8 below) and not
# max_seq_len comes back as the exported max_position_embeddings (test_max_seq_len_round_trip).
SHARED_FIELDS = ("pattern", "vocab_size", "d_model", "d_ffn", "n_heads", "n_kv_heads", "head_dim", "rope",
                 "norm_eps", "tie_embeddings", "init_std")
MAMBA_FIELDS = ("d_ssm", "ssm_head_dim", "d_state", "n_groups", "d_conv", "chunk_size")


def jitter(model):
    """Perturb every saved float tensor, parameters and persistent buffers (MoE expert biases), so
    norms, D, biases are not all alike: a swapped or dropped mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():  # shares storage with the model
            if t.is_floating_point():
                t.add_(torch.randn_like(t) * 0.05)
    return model.eval()


def tiny(arch, **overrides):
    torch.manual_seed(0)
    return jitter(build_model(arch, "tiny", **overrides))


def max_diff(model, hf, vocab):
    torch.manual_seed(2)
    diffs = []
    with torch.no_grad():
        for length in LENGTHS:
            tokens = torch.randint(0, vocab, (2, length))
            diffs.append((model(tokens) - hf(tokens).logits).abs().max().item())
    return max(diffs)


@pytest.fixture
def transformers_log(caplog):
    """Records transformers logs at WARNING and above: its library logger does not propagate to the
    root logger that caplog listens on, so caplog's handler is attached to it directly."""
    logger = logging.getLogger("transformers")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING, logger="transformers")
    yield caplog
    logger.removeHandler(caplog.handler)


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),
    ("llama", {"rope": {"factor": None}, "tie_embeddings": False}),
    ("mamba2", {}),
    ("mamba2", {"n_groups": 2}),
    ("inter_hybrid", {}),
])
def test_to_hf_matches_and_round_trips(arch, overrides):
    model = tiny(arch, **overrides)
    hf = to_hf(model)
    assert isinstance(hf, LlamaForCausalLM if arch == "llama" else GraniteMoeHybridForCausalLM)
    assert max_diff(model, hf, model.config.vocab_size) < 1e-4
    back = from_hf(hf)
    assert_same_state(back, model)
    fields = SHARED_FIELDS + (MAMBA_FIELDS if "M" in model.config.pattern else ())
    assert {f: getattr(back.config, f) for f in fields} == {f: getattr(model.config, f) for f in fields}


@pytest.mark.parametrize("max_seq_len, factor", [(256, None), (256, 32.0), (8192, 32.0), (16384, 8.0)])
def test_max_seq_len_round_trip(max_seq_len, factor):
    """Unscaled RoPE and contexts past the Llama 3 scaling's original one come back unchanged; a shorter
    one is exported above the original context (transformers warns otherwise) and comes back as that."""
    model = build_model("llama", "tiny", max_seq_len=max_seq_len, rope={"factor": factor})
    exported = to_hf(model).config.max_position_embeddings
    assert from_hf(to_hf(model)).config.max_seq_len == exported
    if factor is None or max_seq_len > model.config.rope.original_context:
        assert exported == max_seq_len
    else:
        assert exported > model.config.rope.original_context


def native_llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}))


def native_granite(**overrides):
    fields = dict(
        vocab_size=300, hidden_size=48, shared_intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, num_local_experts=0, attention_multiplier=12 ** -0.5,
        position_embedding_type="rope", layer_types=["linear_attention", "full_attention", "linear_attention"],
        mamba_n_heads=4, mamba_d_head=24, mamba_expand=2, mamba_n_groups=2, mamba_d_state=8, mamba_chunk_size=8)
    return GraniteMoeHybridForCausalLM(GraniteMoeHybridConfig(**{**fields, **overrides}))


@pytest.mark.parametrize("make", [native_llama, native_granite])
def test_from_hf_of_native_model(make):
    torch.manual_seed(0)
    hf = jitter(make())
    model = from_hf(hf)
    assert max_diff(model, hf, hf.config.vocab_size) < 1e-4
    assert_same_state(to_hf(model), hf)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_save_pretrained_loads_silently_with_auto_class(arch, tmp_path, transformers_log, recwarn):
    """The tiny presets' max_seq_len (256) is below the Llama 3 RoPE scaling's original context (8192),
    which transformers warns about unless the export accounts for it; the logits must not change."""
    model = tiny(arch)
    to_hf(model).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert [r.getMessage() for r in transformers_log.records] == []
    assert [str(w.message) for w in recwarn] == []
    assert max_diff(model, loaded, model.config.vocab_size) < 1e-4
    assert_same_state(from_hf(loaded), model)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", SUPPORTED)
def test_hf_config_of_every_preset_is_accepted_silently(arch, size, transformers_log):
    hf_config(model_config(arch, size))
    assert [r.getMessage() for r in transformers_log.records] == []


@pytest.mark.parametrize("arch", ["llama", "inter_hybrid"])  # HF's KV cache and its Mamba caches
def test_hf_generate_matches_ours(arch):
    model = tiny(arch)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    ours = model.generate(prompt, 6)
    theirs = to_hf(model).generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   min_new_tokens=6, do_sample=False)
    assert torch.equal(theirs, ours)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a not in SUPPORTED])
def test_presets_without_a_native_class_export_as_remote_code(arch):
    model = build_model(arch, "tiny")
    with pytest.raises(ValueError, match="no native transformers class: .*; native: llama, mamba2, inter_hybrid"):
        hf_config(model.config)
    assert isinstance(to_hf(model), HybridForCausalLM)


def test_native_archs_are_the_ones_native_refusal_lets_pass():
    """NATIVE_ARCHS names the native presets in messages: it must match what native_refusal lets pass."""
    assert [a for a in ARCHS if native_refusal(model_config(a, "tiny")) is None] == list(NATIVE_ARCHS) \
        == list(SUPPORTED)


def test_refusal_gives_every_reason():
    why = native_refusal(model_config("hybrid_moe", "tiny"))
    assert "MoE FFN" in why and "intra-layer hybrid" in why


def test_mamba_width_not_a_multiple_of_d_model_exports_as_remote_code():
    model = build_model("mamba2", "tiny", d_ssm=96)
    with pytest.raises(ValueError, match="no native transformers class: .*d_ssm=96"):
        hf_config(model.config)
    assert isinstance(to_hf(model), HybridForCausalLM)


@pytest.mark.parametrize("overrides, why", [
    ({"num_local_experts": 2}, "routed experts"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier"),
    ({"attention_multiplier": 1.0}, "attention_multiplier"),
    ({"position_embedding_type": None}, "attention without RoPE"),
])
def test_from_hf_rejects_what_we_cannot_express(overrides, why):
    with pytest.raises(ValueError, match=f"not representable as a HybridLM: .*{why}"):
        from_hf(native_granite(**overrides))


# ---- remote-code export (pretrain/hf_remote): every preset, dense and MoE --------------------------
REMOTE_LENGTH = 37  # past the tiny SWA window (16) and not a multiple of the chunk size (16)
PROMPT, NEW = 12, 14  # generation runs past the window too, so the trimmed SWA cache is used


def rel_diff(model, hf, tokens) -> float:
    with torch.no_grad():
        ours = model(tokens)
        return ((hf(tokens).logits - ours).abs().max() / ours.abs().max()).item()


def assert_generates_like_ours(model, hf, tokens):
    """Greedy generation with the cache equals HybridLM.generate, tokens and the logits that chose them
    (rel 1e-4: random tiny models' greedy tokens alone hide small state errors), and the cache is
    really used: after the prompt, every forward call gets one new token."""
    prompt = tokens[:, :PROMPT]
    seen = []
    hook = hf.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["input_ids"].shape[1]),
                                        with_kwargs=True)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                         do_sample=False, use_cache=True, output_logits=True, return_dict_in_generate=True)
    hook.remove()
    assert seen == [PROMPT] + [1] * (NEW - 1)
    ours, logits = model.generate(prompt, NEW, return_logits=True)
    assert torch.equal(theirs.sequences, ours)
    their_logits = torch.stack(theirs.logits, dim=1)
    assert ((their_logits - logits).abs().max() / logits.abs().max()).item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_remote_code_export_of_every_preset(arch, tmp_path, transformers_log, recwarn):
    """Saved with its code, loaded by AutoModelForCausalLM(trust_remote_code=True) from the copied files
    (the native presets forced to remote code as well): the logits equal ours (rel 1e-4, fp32), greedy
    generation with the cache equals HybridLM.generate, and from_hf gives back the same weights."""
    model = tiny(arch)
    to_hf(model, remote=True).save_pretrained(tmp_path)
    assert {"configuration_hybrid.py", "modeling_hybrid.py"} <= {p.name for p in tmp_path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True, local_files_only=True).eval()
    assert type(loaded).__module__.startswith("transformers_modules.")  # the exported copy, not pretrain's
    assert [r.getMessage() for r in transformers_log.records] == []
    assert [str(w.message) for w in recwarn] == []
    tokens = torch.randint(0, model.config.vocab_size, (2, REMOTE_LENGTH), generator=torch.Generator().manual_seed(3))
    assert rel_diff(model, loaded, tokens) < 1e-4
    assert_generates_like_ours(model, loaded, tokens)
    back = from_hf(loaded)
    assert_same_state(back, model)
    assert not any(b.is_meta for b in back.buffers())
    back.train().loss(tokens[:, :-1], tokens[:, 1:]).backward()  # trainable as it comes back


@pytest.mark.parametrize("arch, overrides", [
    ("intra_hybrid", {"intra.norm": "rms", "intra.scaling": "scalar", "intra.fusion": "add"}),
    ("intra_hybrid", {"intra.norm": "none", "intra.scaling": "vector", "intra.fusion": "concat"}),
    ("intra_hybrid", {"intra.scaling": "gate", "intra.out_proj": "unified", "intra.value_sharing": True}),
    ("intra_hybrid", {"intra.scaling": "diff", "intra.fusion": "concat", "intra.out_proj": "unified"}),
    ("hybrid_moe", {"moe.top_k": 2, "moe.n_shared": 0, "moe.d_expert": 48, "n_groups": 2,
                    "tie_embeddings": False, "rope": {"factor": None}}),
    ("swa_moe", {"window": 8, "n_sink": 0}),
    ("mamba2", {"d_ssm": 96}),  # no native class: Granite's Mamba width is a multiple of d_model
])
def test_remote_code_variants(arch, overrides):
    """The ablation switches of the intra-hybrid mixer, MoE top-2 without shared experts, grouped B/C,
    an untied head, unscaled RoPE and a window without sinks, in memory."""
    model = tiny(arch, **overrides)
    hf = to_hf(model).eval()
    assert isinstance(hf, HybridForCausalLM)
    tokens = torch.randint(0, model.config.vocab_size, (2, REMOTE_LENGTH), generator=torch.Generator().manual_seed(4))
    assert rel_diff(model, hf, tokens) < 1e-4
    assert_generates_like_ours(model, hf, tokens)
    assert_same_state(from_hf(hf), model)


def test_remote_code_loss_uncached_generation_and_refusals():
    """`labels` give our next-token loss; generation without the cache gives the cached tokens; a padded
    attention mask and beam search are refused (the model takes no padding, its cache no beams)."""
    model = tiny("hybrid_moe")
    hf = to_hf(model).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(hf(tokens, labels=tokens).loss, model.loss(tokens[:, :-1], tokens[:, 1:]), rtol=1e-5)
        mask = torch.ones_like(tokens)
        mask[0, 0] = 0
        with pytest.raises(ValueError, match="attention_mask has padding"):
            hf(tokens, attention_mask=mask)
    uncached = hf.generate(tokens, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(uncached, model.generate(tokens, 5))
    with pytest.raises(ValueError, match="does not support beam search"):
        hf.generate(tokens, max_new_tokens=2, num_beams=2)
    cache = hf(tokens[:, :-1], use_cache=True).hybrid_cache  # HF's own loop passes past_key_values: refused, not
    for name, value in (("past_key_values", cache), ("position_ids", torch.arange(1)[None]),  # silently ignored
                        ("inputs_embeds", torch.zeros(2, 1, model.config.d_model))):
        with pytest.raises(ValueError, match=f"{name}: this model does not take it"):
            hf(tokens[:, -1:], **{name: value})


def test_remote_code_imports_only_torch_and_transformers():
    """The files copied into an export must load where only torch and transformers are installed."""
    import ast
    import sys
    from pathlib import Path

    import pretrain.hf_remote

    allowed = set(sys.stdlib_module_names) | {"torch", "transformers"}
    for path in Path(pretrain.hf_remote.__file__).parent.glob("*_hybrid.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            assert all(n.split(".")[0] in allowed for n in names), f"{path.name} imports {names}"


def test_remote_code_kernels_equal_ours():
    """The mirrored pure-PyTorch pieces against the originals, where the tiny presets do not reach:
    Llama 3 RoPE frequencies of a 1B head (its blended band), and the SSD scan with an initial state,
    two B/C groups and a partial last chunk, followed by decoding steps."""
    from pretrain.hf_remote import modeling_hybrid as remote
    from pretrain.model.config import RopeConfig
    from pretrain.model.ops.ssd import ssd_scan_reference, ssd_step
    from pretrain.model.rope import rope_inv_freq

    for rope in (RopeConfig(), RopeConfig(theta=10000.0, factor=8.0, original_context=64), RopeConfig(factor=None)):
        fields = (rope.theta, rope.factor, rope.low_freq_factor, rope.high_freq_factor, rope.original_context)
        assert torch.equal(remote.rope_inv_freq(64, *fields), rope_inv_freq(64, rope))
    g = torch.Generator().manual_seed(6)
    b, l, h, p, n = 2, 21, 4, 8, 5
    x = torch.randn(b, l, h, p, generator=g)
    B, C = torch.randn(b, l, 2, n, generator=g), torch.randn(b, l, 2, n, generator=g)
    dt, A = torch.rand(b, l, h, generator=g), -torch.rand(h, generator=g)
    state = torch.randn(b, h, p, n, generator=g)
    y, final = remote.ssd_scan(x, dt, A, B, C, 8, state)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, 8, state)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(final, final_ref, atol=1e-6)
    for t in range(3):
        step = [v[:, t:t + 1] for v in (x, dt)] + [A] + [v[:, t:t + 1] for v in (B, C)]
        (y, final), (y_ref, final_ref) = remote.ssd_step(*step, final), ssd_step(*step, final_ref)
        assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(final, final_ref, atol=1e-6)


def test_remote_model_from_a_config_is_initialised():
    """A fresh HybridForCausalLM (trained from scratch, no weights) gets training's init distributions,
    not the uninitialised memory its Mamba2 / MoE parameters are created with."""
    from pretrain.model.hf import remote_config

    torch.manual_seed(0)
    hf = HybridForCausalLM(remote_config(model_config("hybrid_moe", "tiny")))
    state = hf.state_dict()
    lo, hi = (torch.tensor(r).log().item() for r in hf.config.a_init_range)
    for name, t in state.items():
        assert torch.isfinite(t).all(), name
        if name.endswith("A_log"):
            assert lo <= t.min() and t.max() <= hi, name
        elif name.endswith((".D", "norm.weight")):
            assert torch.equal(t, torch.ones_like(t)), name
        elif name.endswith(("w1", "w2", "w3", "proj.weight")):
            assert 0.01 < t.std() < 0.03, name
    assert torch.isfinite(hf(torch.randint(0, 512, (1, 9))).logits).all()


def test_remote_code_in_bf16():
    """Exported in the model's dtype; bf16 follows ours (norms, RoPE, softmax, SSM in fp32 alike)."""
    model = tiny("hybrid_moe").to(torch.bfloat16)
    hf = to_hf(model).eval()
    assert hf.dtype == torch.bfloat16
    tokens = torch.randint(0, model.config.vocab_size, (2, REMOTE_LENGTH), generator=torch.Generator().manual_seed(7))
    assert rel_diff(model, hf, tokens) < 1e-2
    prompt = tokens[:, :PROMPT]
    assert torch.equal(hf.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False),
                       model.generate(prompt, 6))
