"""Parameters, training FLOPs per token and inference-cache size, from the config a model is built from.

Parameter counts come from the model itself, built on the meta device (no memory, no drift from
a hand-kept formula). FLOPs: 6 per active matmul parameter per token (forward + backward) plus
the sequence-dependent terms the parameter count misses: attention scores and values over the
visible context, and the SSD scan's chunk-quadratic and state terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pretrain.model.config import ModelConfig
from pretrain.model.pattern import BLOCK_SYMBOLS, parse_pattern

CACHE_BYTES_PER_ELEMENT = 2  # bf16 inference cache


def _meta_model(cfg: ModelConfig) -> Any:
    from pretrain.model.lm import HybridLM

    with torch.device("meta"):
        return HybridLM(cfg)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _embedding_params(model: Any) -> int:
    return model.embed.weight.numel() + (0 if model.head.tied else model.head.weight.numel())


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """{"non_embedding", "embedding", "total", "active_non_embedding"} (active: MoE routes top-k of E)."""
    model = _meta_model(cfg)
    embedding = _embedding_params(model)
    total = _numel(model)
    inactive = 0
    if cfg.moe is not None:
        unused = 1 - cfg.moe.top_k / cfg.moe.n_experts
        inactive = int(sum(sum(w.numel() for w in m.experts.parameters()) * unused for m in model.moe_layers()))
    non_embedding = total - embedding
    return {"non_embedding": non_embedding, "embedding": embedding, "total": total,
            "active_non_embedding": non_embedding - inactive}


@dataclass(frozen=True)
class BlockParams:
    """Non-embedding parameters of one config's sizes as one block of each symbol plus what sits
    outside the blocks (the final norm): the count of any pattern without building a model for
    each, which a depth search needs (`presets`)."""

    per_block: dict[str, int]
    outside: int

    def non_embedding(self, pattern: str) -> int:
        return self.outside + sum(self.per_block[s] for s in parse_pattern(pattern).blocks)


def block_params(cfg: ModelConfig) -> BlockParams:
    """Measured from one meta-device model holding a block of every symbol."""
    model = _meta_model(dataclasses.replace(cfg, pattern="".join(BLOCK_SYMBOLS)))
    per_block = {block.symbol: _numel(block) for block in model.blocks.values()}
    return BlockParams(per_block, _numel(model) - _embedding_params(model) - sum(per_block.values()))


def mean_visible_keys(seq_len: int, window: int | None, n_sink: int) -> float:
    """Average number of keys a query attends to under causal (+ sliding-window with sinks) masking."""
    if window is None:
        return (seq_len + 1) / 2
    total = 0
    for i in range(seq_len):
        recent = min(i + 1, window)
        total += recent + min(n_sink, i + 1 - recent)
    return total / seq_len


def _attention_flops(heads: int, qk_dim: int, v_dim: int, visible: float) -> float:
    return 3 * 2 * heads * (qk_dim + v_dim) * visible  # QK^T and AV, forward x3 for fwd+bwd


def _ssd_flops(heads: int, head_dim: int, d_state: int, n_groups: int, chunk: int) -> float:
    """Per token, fwd+bwd: within-chunk C.B^T and its product with x (causal: chunk/2 keys on
    average), plus writing and reading the chunk states."""
    fwd = chunk * d_state * n_groups + chunk * head_dim * heads + 4 * head_dim * d_state * heads
    return 3 * fwd


def _symbol_sequence_flops(cfg: ModelConfig, sym: str, seq_len: int) -> float:
    ic = cfg.intra
    if sym in "AS":
        window = cfg.window if sym == "S" else None
        visible = mean_visible_keys(seq_len, window, cfg.n_sink if window else 0)
        return _attention_flops(cfg.n_heads, cfg.head_dim, cfg.head_dim, visible)
    if sym == "M":
        return _ssd_flops(cfg.ssm_heads, cfg.ssm_head_dim, cfg.d_state, cfg.n_groups, cfg.chunk_size)
    return (_attention_flops(ic.attn_heads, ic.qk_head_dim, ic.head_dim, mean_visible_keys(seq_len, None, 0))
            + _ssd_flops(ic.ssm_heads, ic.head_dim, ic.d_state, cfg.n_groups, cfg.chunk_size))


def sequence_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The FLOPs per token that depend on sequence length (attention and SSD), fwd+bwd."""
    return sum(_symbol_sequence_flops(cfg, sym, seq_len) for sym in cfg.blocks)


def block_flops_per_token(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Training FLOPs per token of each block, in pattern order (6 per active matmul parameter
    plus its sequence terms): what pipeline stages are balanced on."""
    per_symbol = block_params(cfg).per_block
    moe_inactive = 0.0
    if cfg.moe is not None:
        moe_inactive = 3 * cfg.d_model * cfg.d_expert * (cfg.moe.n_experts - cfg.moe.top_k)
    return [6 * (per_symbol[sym] - moe_inactive) + _symbol_sequence_flops(cfg, sym, seq_len) for sym in cfg.blocks]


def flops_per_token(cfg: ModelConfig, seq_len: int, params: dict[str, int] | None = None) -> dict[str, float]:
    """Training FLOPs per token. `total` includes the LM head (use it for MFU); `non_embedding`
    leaves the head out, the convention of the paper's FLOPs column."""
    params = params or count_params(cfg)
    non_embedding = 6 * params["active_non_embedding"] + sequence_flops_per_token(cfg, seq_len)
    return {"non_embedding": non_embedding, "total": non_embedding + 6 * cfg.d_model * cfg.vocab_size}


def cache_elements(cfg: ModelConfig, seq_len: int) -> int:
    """Inference-cache elements for one sequence of `seq_len` tokens: K and V per attention layer
    (sliding-window layers keep window + sinks), conv and SSM state per Mamba2 layer."""
    def kv(kv_heads: int, qk_dim: int, v_dim: int, kept: int) -> int:
        return kv_heads * (qk_dim + v_dim) * kept

    def ssm(heads: int, head_dim: int, d_state: int) -> int:
        conv = (heads * head_dim + 2 * cfg.n_groups * d_state) * (cfg.d_conv - 1)
        return conv + heads * head_dim * d_state

    ic, total = cfg.intra, 0
    for sym in cfg.blocks:
        if sym == "A":
            total += kv(cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, seq_len)
        elif sym == "S":
            total += kv(cfg.n_kv_heads, cfg.head_dim, cfg.head_dim, min(seq_len, cfg.window + cfg.n_sink))
        elif sym == "M":
            total += ssm(cfg.ssm_heads, cfg.ssm_head_dim, cfg.d_state)
        else:
            total += kv(ic.kv_heads, ic.qk_head_dim, ic.head_dim, seq_len) + ssm(ic.ssm_heads, ic.head_dim, ic.d_state)
    return total


def cache_bytes(cfg: ModelConfig, seq_len: int, element_bytes: int = CACHE_BYTES_PER_ELEMENT,
                ssm_state_bytes: int = CACHE_BYTES_PER_ELEMENT) -> int:
    """Inference-cache bytes for one sequence: K/V and conv states at `element_bytes`, SSM states at
    `ssm_state_bytes`. The defaults (all bf16) are the paper's convention; the static decoder keeps
    its SSM states in fp32, as the scan accumulates (`pretrain.model.static_cache.SSMState`)."""
    states = ssm_state_elements(cfg)
    return (cache_elements(cfg, seq_len) - states) * element_bytes + states * ssm_state_bytes


def ssm_state_elements(cfg: ModelConfig) -> int:
    """The SSM states' share of `cache_elements` (heads x head_dim x d_state per Mamba2 layer or
    intra-hybrid SSM branch); it does not grow with the sequence."""
    ic = cfg.intra
    return sum(cfg.ssm_heads * cfg.ssm_head_dim * cfg.d_state if sym == "M" else ic.ssm_heads * ic.head_dim * ic.d_state
               for sym in cfg.blocks if sym in "MH")


def report(cfg: ModelConfig, seq_len: int) -> dict[str, Any]:
    """Everything `python -m pretrain.describe` prints for one model."""
    params = count_params(cfg)
    flops = flops_per_token(cfg, seq_len, params)
    return {
        "pattern": cfg.pattern,
        "n_layers": cfg.n_layers,
        "non_embedding_params": params["non_embedding"],
        "embedding_params": params["embedding"],
        "active_non_embedding_params": params["active_non_embedding"],
        "seq_len": seq_len,
        "flops_per_token": flops["total"],
        "non_embedding_flops_per_token": flops["non_embedding"],
        "cache_bytes": cache_bytes(cfg, seq_len),
    }
