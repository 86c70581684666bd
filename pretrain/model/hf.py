"""Hugging Face interop: `to_hf(model)` and `from_hf(hf_model)`, both function-preserving.

Every architecture exports. Those transformers has a class for keep it (native); the rest (intra-
layer hybrids, sliding-window attention with sinks, MoE, Mamba widths Granite cannot express) export
as `HybridForCausalLM`, self-contained modeling code in `pretrain/hf_remote/` that `save_pretrained`
copies next to the weights (`auto_map`, loaded with `trust_remote_code=True`). Its parameters keep our
names inside each block; `_remote_name` maps the outer ones.

Native: attention-only stacks map to `LlamaForCausalLM`; stacks with Mamba2 blocks ('M', optionally with
'A') map to `GraniteMoeHybridForCausalLM`, whose decoder layer has our block shape (pre-norm mixer
+ residual, pre-norm gated MLP + residual). Granite is made an identity of ours by fixing its
multipliers (embedding, residual, logits 1; attention 1/sqrt(head_dim)), disabling routed
experts (`num_local_experts=0`: the shared MLP is our dense SwiGLU) and giving it our RoPE
(Llama 3 scaling via `rope_type="llama3"`). `native_refusal` says why a model has no native class.

Targets transformers 5.x config conventions (`rope_parameters`, `layer_types` of
"full_attention" / "linear_attention").
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor
from transformers import (
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
)

from pretrain.hf_remote.configuration_hybrid import MODEL_TYPE, HybridConfig
from pretrain.hf_remote.modeling_hybrid import HybridForCausalLM
from pretrain.model.config import ModelConfig, RopeConfig
from pretrain.model.lm import HybridLM

# Granite's names for the two mixers; ours are 'A' and 'M'.
_LAYER_TYPES = {"A": "full_attention", "M": "linear_attention"}
_SYMBOLS = {v: k for k, v in _LAYER_TYPES.items()}
# The presets that export to native transformers classes (the others export as remote code).
NATIVE_ARCHS = ("llama", "mamba2", "inter_hybrid")
# Our outer module names -> the remote model's (blocks.{i} -> model.layers.{i}); block internals are alike.
_REMOTE_OUTER = {"embed": "model.embed_tokens", "norm": "model.norm", "head": "lm_head", "blocks": "model.layers"}
# Mamba2 parameters: Granite name -> ours, concatenated in order (Granite packs in_proj rows as
# [z, x, B, C, dt] and conv1d channels as [x, B, C]; conv1d.weight is [conv_dim, 1, k], ours [., k]).
_MAMBA_KEYS = {"in_proj.weight": tuple(f"{p}_proj.weight" for p in "z x B C dt".split()),
               "conv1d.weight": ("conv_x.weight", "conv_B.weight", "conv_C.weight"),
               "conv1d.bias": ("conv_x.bias", "conv_B.bias", "conv_C.bias"), "dt_bias": ("dt_bias",),
               "A_log": ("A_log",), "D": ("D",), "norm.weight": ("norm.weight",),
               "out_proj.weight": ("out_proj.weight",)}


def to_hf(model: HybridLM, remote: bool | None = None) -> PreTrainedModel:
    """A transformers model computing the same logits as `model` (same device, dtype and mode): the
    native class where transformers has one, else (or with `remote=True`) `HybridForCausalLM`."""
    cfg = model.config
    if remote is None:
        remote = native_refusal(cfg) is not None
    if remote:
        return _to_remote(model)
    config = hf_config(cfg)
    model_class = LlamaForCausalLM if isinstance(config, LlamaConfig) else GraniteMoeHybridForCausalLM
    hf: PreTrainedModel = model_class(config)
    ours = model.state_dict()
    params = hf.state_dict()
    state = {hf_key: torch.cat([ours[k] for k in keys]).reshape(params[hf_key].shape)
             for hf_key, keys in _key_map(cfg).items()}
    hf.load_state_dict(state, strict=True)
    weight = model.embed.weight
    return hf.to(device=weight.device, dtype=weight.dtype).train(model.training)


def _to_remote(model: HybridLM) -> HybridForCausalLM:
    # save_pretrained then writes auto_map and copies configuration_hybrid.py / modeling_hybrid.py.
    HybridConfig.register_for_auto_class()
    HybridForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    with torch.device("meta"):
        hf = HybridForCausalLM(remote_config(model.config))
    hf.load_state_dict({_remote_name(k): v.detach().clone() for k, v in model.state_dict().items()},
                       strict=True, assign=True)
    return hf.train(model.training)


def remote_config(cfg: ModelConfig) -> HybridConfig:
    """The remote model's config: our fields as they are, plus the expanded block symbols."""
    return HybridConfig(blocks=list(cfg.blocks), **cfg.to_dict())


def _remote_name(name: str) -> str:
    """Our parameter or buffer name -> the remote model's (the one place to change with lm.py's names)."""
    outer, _, rest = name.partition(".")
    return f"{_REMOTE_OUTER[outer]}.{rest}"


def hf_config(cfg: ModelConfig) -> PreTrainedConfig:
    """The native `LlamaConfig` or `GraniteMoeHybridConfig` of `cfg`; `ValueError` when there is none."""
    why = native_refusal(cfg)
    if why is not None:
        raise ValueError(f"no native transformers class: {why}; native: {', '.join(NATIVE_ARCHS)} "
                         "(to_hf exports the rest as remote code)")
    if set(cfg.blocks) == {"A"}:
        return LlamaConfig(**_common_hf_config(cfg), mlp_bias=False)
    return _granite_config(cfg)


def from_hf(hf_model: PreTrainedModel) -> HybridLM:
    """Our HybridLM for a `LlamaForCausalLM`, `GraniteMoeHybridForCausalLM` or exported remote-code
    `HybridForCausalLM` (weights copied)."""
    if getattr(hf_model.config, "model_type", None) == MODEL_TYPE:
        return _from_remote(hf_model)
    if isinstance(hf_model, LlamaForCausalLM):
        cfg = _from_llama_config(hf_model.config)
    elif isinstance(hf_model, GraniteMoeHybridForCausalLM):
        cfg = _from_granite_config(hf_model.config)
    else:
        raise ValueError(f"from_hf supports LlamaForCausalLM, GraniteMoeHybridForCausalLM and our exported "
                         f"HybridForCausalLM, not {type(hf_model).__name__}")
    with torch.device("meta"):
        model = HybridLM(cfg)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    params = hf_model.state_dict()
    state: dict[str, Tensor] = {}
    for hf_key, keys in _key_map(cfg).items():
        parts = params[hf_key].detach().split([shapes[k][0] for k in keys])
        state.update({k: p.reshape(shapes[k]).clone() for k, p in zip(keys, parts)})
    model.load_state_dict(state, strict=True, assign=True)
    return model.train(hf_model.training)


def _from_remote(hf_model: PreTrainedModel) -> HybridLM:
    c = hf_model.config
    cfg = ModelConfig.from_dict({f.name: getattr(c, f.name) for f in dataclasses.fields(ModelConfig)})
    _need(list(cfg.blocks) == list(c.blocks), f"pattern {cfg.pattern!r} does not expand to blocks {c.blocks}")
    with torch.device("meta"):
        model = HybridLM(cfg)
    theirs = hf_model.state_dict()
    state = {k: theirs[_remote_name(k)].detach().clone() for k in model.state_dict()}
    model.load_state_dict(state, strict=True, assign=True)
    device = hf_model.model.embed_tokens.weight.device
    for module in model.modules():  # non-persistent buffers (MoE load counts) start at zero
        for name, buf in module.named_buffers(recurse=False):
            if buf.is_meta:
                setattr(module, name, torch.zeros_like(buf, device=device))
    return model.train(hf_model.training)


def native_refusal(cfg: ModelConfig) -> str | None:
    """Why `cfg` has no native transformers class (every reason, '; '-joined), or None if it has one."""
    why = []
    if cfg.moe is not None:
        # Granite's MoE routes with a softmax over the top-k logits and has no router bias.
        why.append("MoE FFN (sigmoid router with a balancing bias, shared + routed experts)")
    if "H" in cfg.blocks:
        why.append("intra-layer hybrid 'H' blocks (attention and Mamba2 in one mixer)")
    if "S" in cfg.blocks:
        why.append("sliding-window attention with sinks ('S' blocks) has no transformers counterpart")
    if "M" in cfg.blocks and cfg.d_ssm % cfg.d_model:
        why.append(f"GraniteMoeHybrid's Mamba width is an integer mamba_expand * hidden_size, and "
                   f"d_ssm={cfg.d_ssm} is not a multiple of d_model={cfg.d_model}")
    return "; ".join(why) or None


def _key_map(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF parameter name -> our parameter name(s), concatenated along dim 0 in that order."""
    llama = set(cfg.blocks) == {"A"}
    keys = {"model.embed_tokens.weight": ("embed.weight",), "model.norm.weight": ("norm.weight",),
            "lm_head.weight": ("embed.weight" if cfg.tie_embeddings else "head.weight",)}
    for i, symbol in enumerate(cfg.blocks):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        keys[hf + "input_layernorm.weight"] = (ours + "mixer_norm.weight",)
        keys[hf + "post_attention_layernorm.weight"] = (ours + "ffn_norm.weight",)
        if llama:
            keys[hf + "mlp.gate_proj.weight"] = (ours + "ffn.w1.weight",)
            keys[hf + "mlp.up_proj.weight"] = (ours + "ffn.w3.weight",)
            keys[hf + "mlp.down_proj.weight"] = (ours + "ffn.w2.weight",)
        else:  # Granite's shared MLP: input_linear rows are [gate; up]
            keys[hf + "shared_mlp.input_linear.weight"] = (ours + "ffn.w1.weight", ours + "ffn.w3.weight")
            keys[hf + "shared_mlp.output_linear.weight"] = (ours + "ffn.w2.weight",)
        if symbol == "A":
            for p in "qkvo":
                keys[f"{hf}self_attn.{p}_proj.weight"] = (f"{ours}mixer.{p}_proj.weight",)
        else:  # 'M'
            for k, v in _MAMBA_KEYS.items():
                keys[f"{hf}mamba.{k}"] = tuple(f"{ours}mixer.{name}" for name in v)
    return keys


def _rope_parameters(rope: RopeConfig) -> dict:
    if rope.factor is None:
        return {"rope_type": "default", "rope_theta": rope.theta}
    return {"rope_type": "llama3", "rope_theta": rope.theta, "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor, "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_context}


def _max_position_embeddings(cfg: ModelConfig) -> int:
    """Our max_seq_len, raised past the Llama 3 scaling's original context where it is not: transformers
    warns unless original_max_position_embeddings < max_position_embeddings, and the field changes no
    logit (llama3 frequencies depend on the original context only). A re-import reads it as max_seq_len."""
    if cfg.rope.factor is None:
        return cfg.max_seq_len
    return max(cfg.max_seq_len, cfg.rope.original_context + 1)


def _common_hf_config(cfg: ModelConfig) -> dict:
    """Fields Llama and Granite name alike."""
    return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn,
                num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, hidden_act="silu",
                attention_bias=False, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
                max_position_embeddings=_max_position_embeddings(cfg), initializer_range=cfg.init_std,
                rope_parameters=_rope_parameters(cfg.rope))


def _granite_config(cfg: ModelConfig) -> GraniteMoeHybridConfig:
    # use_cache off for Mamba-only stacks: transformers' hybrid cache counts seen tokens from an
    # attention layer and raises when there is none (forward and generate still work uncached).
    return GraniteMoeHybridConfig(
        **_common_hf_config(cfg), use_cache="A" in cfg.blocks, shared_intermediate_size=cfg.d_ffn,
        num_local_experts=0, embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0,
        attention_multiplier=cfg.head_dim ** -0.5, position_embedding_type="rope",
        layer_types=[_LAYER_TYPES[s] for s in cfg.blocks], mamba_n_heads=cfg.ssm_heads,
        mamba_d_head=cfg.ssm_head_dim, mamba_expand=cfg.d_ssm // cfg.d_model, mamba_n_groups=cfg.n_groups,
        mamba_d_state=cfg.d_state, mamba_d_conv=cfg.d_conv, mamba_chunk_size=cfg.chunk_size,
        mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=(0.0, math.inf))


def _need(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(f"transformers model not representable as a HybridLM: {why}")


def _rope_config(params: dict) -> RopeConfig:
    kind = params.get("rope_type", "default")
    _need(kind in ("default", "llama3"), f"rope_type '{kind}' (only 'default' and 'llama3')")
    _need(params.get("partial_rotary_factor", 1.0) == 1.0, "partial rotary embeddings")
    if kind == "default":
        return RopeConfig(theta=params["rope_theta"], factor=None)
    return RopeConfig(theta=params["rope_theta"], factor=params["factor"],
                      low_freq_factor=params["low_freq_factor"], high_freq_factor=params["high_freq_factor"],
                      original_context=int(params["original_max_position_embeddings"]))


def _common_fields(c) -> dict:
    """ModelConfig fields read alike from a Llama or Granite config."""
    _need(c.hidden_act == "silu", f"hidden_act '{c.hidden_act}' (ours is SiLU)")
    _need(not c.attention_bias, "attention biases")
    return dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                n_kv_heads=c.num_key_value_heads, head_dim=_head_dim(c), norm_eps=c.rms_norm_eps,
                tie_embeddings=c.tie_word_embeddings, init_std=c.initializer_range,
                max_seq_len=c.max_position_embeddings, rope=_rope_config(c.rope_parameters))


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _from_llama_config(c: LlamaConfig) -> ModelConfig:
    _need(not c.mlp_bias, "MLP biases")
    return ModelConfig(pattern="A" * c.num_hidden_layers, d_ffn=c.intermediate_size, **_common_fields(c))


def _from_granite_config(c: GraniteMoeHybridConfig) -> ModelConfig:
    _need(not c.num_local_experts, f"{c.num_local_experts} routed experts (ours: dense FFN only)")
    for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
        _need(getattr(c, name) == 1, f"{name}={getattr(c, name)} (ours has no such scale; need 1)")
    _need(math.isclose(c.attention_multiplier, _head_dim(c) ** -0.5),
          f"attention_multiplier={c.attention_multiplier} (ours is 1/sqrt(head_dim))")
    _need(all(t in _SYMBOLS for t in c.layer_types), f"layer types {sorted(set(c.layer_types))}")
    pattern = "".join(_SYMBOLS[t] for t in c.layer_types)
    _need("A" not in pattern or c.position_embedding_type == "rope",
          f"attention without RoPE (position_embedding_type={c.position_embedding_type!r})")
    _need(c.mamba_conv_bias and not c.mamba_proj_bias, "Mamba projection biases or a bias-free conv")
    _need(tuple(c.time_step_limit) == (0.0, math.inf), f"time_step_limit {c.time_step_limit} (ours: none)")
    return ModelConfig(
        pattern=pattern, d_ffn=c.shared_intermediate_size, d_ssm=c.mamba_expand * c.hidden_size,
        ssm_head_dim=c.mamba_d_head, d_state=c.mamba_d_state, n_groups=c.mamba_n_groups,
        d_conv=c.mamba_d_conv, chunk_size=c.mamba_chunk_size, **_common_fields(c))
