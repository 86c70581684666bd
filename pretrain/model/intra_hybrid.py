"""Intra-layer (parallel) hybrid mixer: attention and Mamba2 side by side on one normalised input.

    out = W_out( a_ssm * Norm(M_ssm(x))  (+)  a_attn * Norm(M_attn(x)) )

Every axis of the study (PAPER T6/T7) is a config switch; defaults are the winner: GroupNorm on
each branch, no scaling, subtract fusion, no value sharing, separate output projections.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import Placement, Shard

from parallel.tensor_parallel import linear, local, local_replicated

from pretrain.model.attention import Attention
from pretrain.model.config import IntraConfig, ModelConfig
from pretrain.model.mamba2 import Mamba2
from pretrain.model.norms import HeadGroupNorm, RMSNorm
from pretrain.model.packed import PackedDocs


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
        self.tp_group: dist.ProcessGroup | None = None  # the scalar's gradient is summed over TP
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

    def shard_for_tp(self, group: dist.ProcessGroup) -> dict[str, Placement]:
        self.tp_group = group
        return {"vector": {"weight": Shard(0)}, "gate": {"gate.weight": Shard(0)}}.get(self.kind, {})

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        if self.kind == "scalar":
            return y * local_replicated(self.weight, self.tp_group)
        if self.kind == "vector":
            return y * local(self.weight)
        if self.kind == "gate":
            return y * torch.sigmoid(linear(x, self.gate))
        return y


class DiffLambda(nn.Module):
    """Differential-Transformer lambda = exp(q1.k1) - exp(q2.k2) + lambda_init, scaling the attention
    branch that is subtracted from the Mamba branch."""

    def __init__(self, dim: int, layer_id: int):
        super().__init__()
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_id)
        self.q1, self.k1, self.q2, self.k2 = (nn.Parameter(torch.empty(dim)) for _ in range(4))
        self.tp_group: dist.ProcessGroup | None = None  # replicated; gradients summed over TP

    def reset_parameters(self, init_std: float) -> None:
        for p in (self.q1, self.k1, self.q2, self.k2):
            nn.init.normal_(p, std=0.1)

    def forward(self) -> Tensor:
        q1, k1, q2, k2 = (local_replicated(p, self.tp_group) for p in (self.q1, self.k1, self.q2, self.k2))
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init


class IntraHybrid(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        ic: IntraConfig = cfg.intra
        self.cfg, self.init_std = ic, cfg.init_std
        self.out_init_std = cfg.out_init_std
        self.attn = Attention(cfg.d_model, ic.attn_heads, ic.kv_heads, ic.qk_head_dim, cfg.rope,
                              v_head_dim=ic.head_dim, project_out=False, init_std=cfg.init_std,
                              shared_values=ic.value_sharing)
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

    def shard_for_tp(self, tp: int, group: dist.ProcessGroup) -> dict[str, Placement]:
        """Both branches by their own heads (per-head GroupNorm stays local; a branch RMSNorm
        all-reduces its sum of squares); output projections row-parallel."""
        ic = self.cfg
        if ic.kv_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide the intra-hybrid attention's K/V heads "
                             f"(model.overrides.intra.kv_heads={ic.kv_heads}; each rank keeps whole heads); choose a "
                             "tp that divides it")
        if ic.out_proj == "unified" and ic.fusion == "concat":
            raise ValueError("parallel.tp > 1 does not support intra.fusion='concat' with intra.out_proj='unified' "
                             "(the concatenated heads do not match the projection's column shards); use "
                             "intra.out_proj='separate'")
        plan = {f"attn.{k}": v for k, v in self.attn.shard_for_tp(tp, group).items()}
        plan.update({f"ssm.{k}": v for k, v in self.ssm.shard_for_tp(tp, group).items()})
        for name in ("norm_attn", "norm_ssm"):
            norm = getattr(self, name)
            if isinstance(norm, RMSNorm):
                norm.tp_group = group
            plan.update({f"{name}.{p}": Shard(0) for p, _ in norm.named_parameters()})
        for name in ("scale_attn", "scale_ssm"):
            if hasattr(self, name):
                plan.update({f"{name}.{k}": v for k, v in getattr(self, name).shard_for_tp(group).items()})
        if hasattr(self, "diff_lambda"):
            self.diff_lambda.tp_group = group
        for name in ("out_proj", "out_ssm", "out_attn"):
            if hasattr(self, name):
                plan[f"{name}.weight"] = Shard(1)
        return plan

    def forward(self, x: Tensor, positions: Tensor | PackedDocs, state: dict | None = None) -> Tensor:
        """Both branches see the same positions (PackedDocs: both stay within documents)."""
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
            y_ssm, y_attn = linear(y_ssm, self.out_ssm), linear(y_attn, self.out_attn)
        if ic.fusion == "add":
            fused = y_ssm + y_attn
        elif ic.fusion == "subtract":
            fused = y_ssm - y_attn
        else:
            fused = torch.cat([y_ssm, y_attn], dim=-1)
        return linear(fused, self.out_proj) if ic.out_proj == "unified" else fused
