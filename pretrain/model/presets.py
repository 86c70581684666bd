"""`--arch` x `--size` presets (PAPER T8) and `build_model`.

Architectures: llama, swa, mamba2, inter_hybrid, intra_hybrid, each also with `_moe`;
`hybrid_moe` is intra_hybrid 1:5 with MoE (the paper's best). Sizes: tiny (CPU tests), 100m,
350m, 1b, 3b.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pretrain.model.config import IntraConfig, ModelConfig, MoEConfig
from pretrain.model.pattern import hybrid_pattern, parse_ratio

BASE_ARCHS = ("llama", "swa", "mamba2", "inter_hybrid", "intra_hybrid")
ARCHS = (*BASE_ARCHS, *(f"{a}_moe" for a in BASE_ARCHS), "hybrid_moe")
SIZES = ("tiny", "100m", "350m", "1b", "3b")
SWA_GLOBAL_RATIO = "3:13"  # 3 global of 16 layers at 1B, placed in the middle (63 MiB cache at 8K)

# Shared dims per size: Llama columns (attention) and Mamba columns (SSM) of PAPER T8.
_DIMS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=512, d_model=64, d_ffn=192, n_heads=4, n_kv_heads=2, head_dim=16,
                 d_ssm=128, ssm_head_dim=32, d_state=16, chunk_size=16, window=16, n_sink=4,
                 max_seq_len=256),
    "100m": dict(d_model=1024, d_ffn=3072, n_heads=16, n_kv_heads=4, head_dim=64,
                 d_ssm=2048, ssm_head_dim=128, d_state=128),
    "350m": dict(d_model=1536, d_ffn=4096, n_heads=24, n_kv_heads=8, head_dim=64,
                 d_ssm=3072, ssm_head_dim=128, d_state=128),
    "1b": dict(d_model=2048, d_ffn=8192, n_heads=32, n_kv_heads=8, head_dim=64,
               d_ssm=4096, ssm_head_dim=128, d_state=128),
    "3b": dict(d_model=3072, d_ffn=8192, n_heads=32, n_kv_heads=8, head_dim=96,
               d_ssm=6144, ssm_head_dim=192, d_state=256),
}
# Blocks per family: attention stacks, Mamba stacks, hybrid stacks (1B/3B from PAPER; smaller
# hybrids use the Mamba depth).
_DEPTH = {
    "tiny": dict(attn=4, mamba=4, hybrid=6),
    "100m": dict(attn=8, mamba=6, hybrid=6),
    "350m": dict(attn=14, mamba=11, hybrid=11),
    "1b": dict(attn=16, mamba=13, hybrid=13),
    "3b": dict(attn=28, mamba=21, hybrid=22),
}
# Intra-hybrid branches: half the heads each; Q/K at half the value head width (Diff-Transformer
# style). 1B: Q/K 1152, d_ssm 2304; 3B: d_ssm 3072, d_state 256 (PAPER).
_INTRA = {
    "tiny": IntraConfig(attn_heads=2, kv_heads=1, ssm_heads=2, head_dim=32, qk_head_dim=16, d_state=16),
    "100m": IntraConfig(attn_heads=8, kv_heads=2, ssm_heads=8, head_dim=144, qk_head_dim=72, d_state=128),
    "350m": IntraConfig(attn_heads=12, kv_heads=4, ssm_heads=12, head_dim=144, qk_head_dim=72, d_state=128),
    "1b": IntraConfig(attn_heads=16, kv_heads=4, ssm_heads=16, head_dim=144, qk_head_dim=72, d_state=128),
    "3b": IntraConfig(attn_heads=16, kv_heads=4, ssm_heads=16, head_dim=192, qk_head_dim=96, d_state=256),
}


def default_pattern(arch: str, size: str, ratio: str | None = None, placement: str | None = None) -> str:
    base = arch.removesuffix("_moe") if arch != "hybrid_moe" else "intra_hybrid"
    depth = _DEPTH[size]
    if base == "llama":
        return "A" * depth["attn"]
    if base == "swa":
        globals_ = hybrid_pattern(ratio or SWA_GLOBAL_RATIO, depth["attn"], placement or "middle")
        return globals_.replace("M", "S")
    if base == "mamba2":
        return "M" * depth["mamba"]
    if base == "inter_hybrid":
        return hybrid_pattern(ratio or "1:5", depth["hybrid"], placement or "middle", "A")
    return hybrid_pattern(ratio or "1:5", depth["hybrid"], placement or "scatter", "H")


def split_branch_heads(intra: IntraConfig, branch_ratio: str) -> IntraConfig:
    """Re-split the intra-hybrid heads attention:Mamba (PAPER T20), keeping the total and the GQA
    group size; attention heads round to a whole number of KV groups (1B 2:1 -> 20:12)."""
    a, m = parse_ratio(branch_ratio)
    total, group = intra.attn_heads + intra.ssm_heads, intra.attn_heads // intra.kv_heads
    attn = min((total - 1) // group * group, max(group, round(total * a / (a + m) / group) * group))
    return dataclasses.replace(intra, attn_heads=attn, kv_heads=attn // group, ssm_heads=total - attn)


def model_config(arch: str, size: str, ratio: str | None = None, placement: str | None = None,
                 branch_ratio: str | None = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset. `ratio` ('1:3') and `placement` ('front', 'cluster', ...)
    rebuild the hybrid pattern; `branch_ratio` ('2:1') re-splits intra-hybrid heads; other
    keywords override ModelConfig fields, nested ones as dicts (`intra={"fusion": "concat"}`) or
    dotted (`**{"intra.fusion": "concat"}`)."""
    if arch not in ARCHS:
        raise ValueError(f"unknown --arch '{arch}': choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise ValueError(f"unknown --size '{size}': choose one of {', '.join(SIZES)}")
    fields: dict[str, Any] = dict(_DIMS[size])
    fields["pattern"] = default_pattern(arch, size, ratio, placement)
    intra = split_branch_heads(_INTRA[size], branch_ratio) if branch_ratio else _INTRA[size]
    fields["intra"] = dataclasses.asdict(intra)
    fields["moe"] = dataclasses.asdict(MoEConfig()) if arch.endswith("_moe") else None
    fields["rope"] = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if head not in {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ValueError(f"unknown model field '{key}': see pretrain/model/config.py for the fields")
        if rest or isinstance(value, dict):
            nested = fields.get(head) or (dataclasses.asdict(MoEConfig()) if head == "moe" else {})
            fields[head] = {**nested, **({rest: value} if rest else value)}
        else:
            fields[head] = value
    try:
        return ModelConfig.from_dict(fields)
    except TypeError as e:  # an unknown nested key
        raise ValueError(f"model config: {e}") from None


def build_model(arch: str, size: str, device: Any = None, **overrides: Any):
    """Build a HybridLM for a preset, initialised from torch's current RNG. The modules are made on
    the meta device and materialised once (no throw-away default init: halves the start-up of a
    3B-parameter build). On device 'meta' nothing is allocated (call `to_empty` and
    `init_weights` later)."""
    import torch

    from pretrain.model.lm import HybridLM

    cfg = model_config(arch, size, **overrides)
    with torch.device("meta"):
        model = HybridLM(cfg)
    if torch.device(device or "cpu").type != "meta":
        model.to_empty(device=device or "cpu")
        model.init_weights()
    return model
