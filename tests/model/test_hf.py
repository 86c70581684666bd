"""Hugging Face interop: to_hf / from_hf preserve the function against transformers' own forward,
round-trip exactly, survive save_pretrained -> AutoModelForCausalLM without a warning from
transformers, and refuse what they cannot express."""

import logging

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (AutoModelForCausalLM, GraniteMoeHybridConfig, GraniteMoeHybridForCausalLM,
                          LlamaConfig, LlamaForCausalLM)

from pretrain.model import ARCHS, SIZES, build_model, model_config
from pretrain.model.hf import EXPORTABLE_ARCHS, export_refusal, from_hf, hf_config, to_hf

SUPPORTED = ("llama", "mamba2", "inter_hybrid")
LENGTHS = (32, 21)  # a multiple of the chunk size (16 tiny, 8 below) and not
# max_seq_len comes back as the exported max_position_embeddings (test_max_seq_len_round_trip).
SHARED_FIELDS = ("pattern", "vocab_size", "d_model", "d_ffn", "n_heads", "n_kv_heads", "head_dim", "rope",
                 "norm_eps", "tie_embeddings", "init_std")
MAMBA_FIELDS = ("d_ssm", "ssm_head_dim", "d_state", "n_groups", "d_conv", "chunk_size")


def jitter(model):
    """Perturb every parameter so norms, D, biases are not all alike: a swapped mapping shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
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
def test_unrepresentable_presets_raise(arch):
    with pytest.raises(ValueError, match="not representable in transformers: .*; exportable: llama, mamba2, "
                                         "inter_hybrid"):
        to_hf(build_model(arch, "tiny"))


def test_exportable_archs_are_the_ones_to_hf_maps():
    """EXPORTABLE_ARCHS names the supported presets in refusals: it must match what export_refusal lets pass."""
    assert [a for a in ARCHS if export_refusal(model_config(a, "tiny")) is None] == list(EXPORTABLE_ARCHS) \
        == list(SUPPORTED)


def test_refusal_gives_every_reason():
    why = export_refusal(model_config("hybrid_moe", "tiny"))
    assert "MoE FFN" in why and "intra-layer hybrid" in why


def test_mamba_width_must_be_a_multiple_of_d_model():
    with pytest.raises(ValueError, match="not representable in transformers: .*d_ssm=96"):
        to_hf(build_model("mamba2", "tiny", d_ssm=96))


@pytest.mark.parametrize("overrides, why", [
    ({"num_local_experts": 2}, "routed experts"),
    ({"embedding_multiplier": 12.0}, "embedding_multiplier"),
    ({"attention_multiplier": 1.0}, "attention_multiplier"),
    ({"position_embedding_type": None}, "attention without RoPE"),
])
def test_from_hf_rejects_what_we_cannot_express(overrides, why):
    with pytest.raises(ValueError, match=f"not representable as a HybridLM: .*{why}"):
        from_hf(native_granite(**overrides))
