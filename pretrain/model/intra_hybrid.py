"""Intra-layer (parallel) hybrid mixer: attention and Mamba2 side by side on one normalised input.

    out = W_out( a_ssm * Norm(M_ssm(x))  (+)  a_attn * Norm(M_attn(x)) )

Every axis of the study (PAPER T6/T7) is a config switch; defaults are the winner: GroupNorm on
each branch, no scaling, subtract fusion, no value sharing, separate output projections.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.model.attention import Attention
from pretrain.model.config import IntraConfig, ModelConfig
from pretrain.model.mamba2 import Mamba2
from pretrain.model.norms import HeadGroupNorm, RMSNorm


def branch_norm(kind: str, width: int, n_heads: int, eps: float) -> nn.Module:
    if kind == "group":
        return HeadGroupNorm(width, n_heads, eps)
    if kind == "rms":
        return RMSNorm(width, eps)
    return nn.Identity()


class BranchScale(nn.Module):
    """Per-branch scaling: none, a learnable scalar, a per-channel vector, or an input gate."""

    def __init__(self, kind: str, width: int, d_model: int):
        super().__init__()
        self.kind = kind
        if kind == "scalar":
            self.weight = nn.Parameter(torch.ones(1))
        elif kind == "vector":
            self.weight = nn.Parameter(torch.ones(width))
        elif kind == "gate":
            self.gate = nn.Linear(d_model, width, bias=False)

    def reset_parameters(self, init_std: float) -> None:
        if self.kind in ("scalar", "vector"):
            nn.init.ones_(self.weight)
        elif self.kind == "gate":
            nn.init.normal_(self.gate.weight, std=init_std)

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        if self.kind in ("scalar", "vector"):
            return y * self.weight
        if self.kind == "gate":
            return y * torch.sigmoid(self.gate(x))
        return y


class DiffLambda(nn.Module):
    """Differential-Transformer lambda = exp(q1.k1) - exp(q2.k2) + lambda_init, scaling the attention
    branch that is subtracted from the Mamba branch."""

    def __init__(self, dim: int, layer_id: int):
        super().__init__()
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_id)
        self.q1, self.k1, self.q2, self.k2 = (nn.Parameter(torch.empty(dim)) for _ in range(4))

    def reset_parameters(self, init_std: float) -> None:
        for p in (self.q1, self.k1, self.q2, self.k2):
            nn.init.normal_(p, std=0.1)

    def forward(self) -> Tensor:
        return torch.exp((self.q1 * self.k1).sum()) - torch.exp((self.q2 * self.k2).sum()) + self.lambda_init


class IntraHybrid(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        ic: IntraConfig = cfg.intra
        self.cfg, self.init_std = ic, cfg.init_std
        self.out_init_std = cfg.out_init_std
        self.attn = Attention(cfg.d_model, ic.attn_heads, ic.kv_heads, ic.qk_head_dim, cfg.rope,
                              v_head_dim=ic.head_dim, project_out=False, init_std=cfg.init_std)
        self.ssm = Mamba2(cfg.d_model, ic.ssm_heads, ic.head_dim, ic.d_state, cfg.n_groups, cfg.d_conv,
                          cfg.chunk_size, cfg.a_init_range, cfg.dt_min, cfg.dt_max, cfg.norm_eps,
                          gated_norm=False, project_out=False, external_x=ic.value_sharing,
                          init_std=cfg.init_std)
        self.norm_attn = branch_norm(ic.norm, ic.attn_width, ic.attn_heads, cfg.norm_eps)
        self.norm_ssm = branch_norm(ic.norm, ic.ssm_width, ic.ssm_heads, cfg.norm_eps)
        if ic.scaling == "diff":
            self.diff_lambda = DiffLambda(ic.qk_head_dim, layer_id)
        else:
            self.scale_attn = BranchScale(ic.scaling, ic.attn_width, cfg.d_model)
            self.scale_ssm = BranchScale(ic.scaling, ic.ssm_width, cfg.d_model)
        if ic.out_proj == "unified":
            fused = ic.attn_width + ic.ssm_width if ic.fusion == "concat" else ic.ssm_width
            self.out_proj = nn.Linear(fused, cfg.d_model, bias=False)
        else:
            d_out = cfg.d_model // 2 if ic.fusion == "concat" else cfg.d_model
            self.out_ssm = nn.Linear(ic.ssm_width, d_out, bias=False)
            self.out_attn = nn.Linear(ic.attn_width, d_out, bias=False)

    def reset_parameters(self) -> None:
        for m in (self.attn, self.ssm, self.norm_attn, self.norm_ssm):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for m in (getattr(self, n, None) for n in ("diff_lambda", "scale_attn", "scale_ssm")):
            if m is not None:
                m.reset_parameters(self.init_std)
        for name in ("out_proj", "out_ssm", "out_attn"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, std=self.out_init_std)

    def forward(self, x: Tensor, positions: Tensor, state: dict | None = None) -> Tensor:
        ic = self.cfg
        attn_state = state.setdefault("attn", {}) if state is not None else None
        ssm_state = state.setdefault("ssm", {}) if state is not None else None
        v = shared_v = None
        if ic.value_sharing:
            v = self.attn.values(x)  # [b, l, kv, head_dim] -> every query head's value for the SSM
            shared_v = v.repeat_interleave(ic.attn_heads // ic.kv_heads, dim=2).flatten(2)
        y_attn = self.norm_attn(self.attn(x, positions, attn_state, v=v))
        y_ssm = self.norm_ssm(self.ssm(x, positions, ssm_state, x=shared_v))
        if ic.scaling == "diff":
            y_attn = y_attn * self.diff_lambda()
        else:
            y_attn, y_ssm = self.scale_attn(y_attn, x), self.scale_ssm(y_ssm, x)
        if ic.out_proj == "separate":
            y_ssm, y_attn = self.out_ssm(y_ssm), self.out_attn(y_attn)
        if ic.fusion == "add":
            fused = y_ssm + y_attn
        elif ic.fusion == "subtract":
            fused = y_ssm - y_attn
        else:
            fused = torch.cat([y_ssm, y_attn], dim=-1)
        return self.out_proj(fused) if ic.out_proj == "unified" else fused
