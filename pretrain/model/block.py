"""The one block shape: x = x + mixer(norm(x)); x = x + ffn(norm(x))."""

from __future__ import annotations


from torch import Tensor, nn

from pretrain.model.attention import attention_from_config
from pretrain.model.config import ModelConfig
from pretrain.model.ffn import SwiGLU
from pretrain.model.intra_hybrid import IntraHybrid
from pretrain.model.mamba2 import mamba2_from_config
from pretrain.model.moe import MoE
from pretrain.model.norms import RMSNorm
from pretrain.model.packed import PackedDocs


def build_mixer(cfg: ModelConfig, symbol: str, layer_id: int) -> nn.Module:
    if symbol in "AS":
        return attention_from_config(cfg, sliding=symbol == "S", layer_id=layer_id)
    if symbol == "M":
        return mamba2_from_config(cfg, layer_id)
    if symbol == "H":
        return IntraHybrid(cfg, layer_id)
    raise ValueError(f"unknown block symbol '{symbol}'")


def build_ffn(cfg: ModelConfig) -> nn.Module:
    if cfg.moe is not None:
        return MoE(cfg.d_model, cfg.d_expert, cfg.moe, cfg.init_std, cfg.out_init_std)
    return SwiGLU(cfg.d_model, cfg.d_ffn, cfg.init_std, cfg.out_init_std)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, symbol: str, layer_id: int):
        super().__init__()
        self.symbol = symbol
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = build_mixer(cfg, symbol, layer_id)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_ffn(cfg)

    def forward(self, x: Tensor, positions: Tensor | PackedDocs, state: dict | None = None,
                gate_up: Tensor | None = None) -> Tensor:
        """`gate_up`: the SwiGLU's packed input weights, from a static decoder (`StaticCache.pack_weights`)."""
        x = x + self.mixer(self.mixer_norm(x), positions, state)
        h = self.ffn_norm(x)
        return x + (self.ffn(h) if gate_up is None else self.ffn(h, gate_up))
