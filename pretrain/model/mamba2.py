"""Mamba2 (SSD) mixer: in_proj -> [z, x, B, C, dt]; causal conv over (x, B, C); SiLU; SSD scan;
D skip; gated group-local RMSNorm; out_proj. Conv and SSM states for decoding."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.norms import GatedRMSNorm
from pretrain.model.ops import causal_conv1d, ssd_scan


class Mamba2(nn.Module):
    """`n_heads` heads of `head_dim` (d_ssm = n_heads * head_dim), `n_groups` B/C groups of `d_state`.

    Variants used by the intra-hybrid mixer: `gated_norm=False` returns y * SiLU(z) without the
    norm (the hybrid normalises branches itself), `project_out=False` skips out_proj, and
    `external_x=True` takes x from the caller (value sharing) so in_proj does not produce it.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int, d_state: int, n_groups: int = 1,
                 d_conv: int = 4, chunk_size: int = 256, a_init_range: tuple[float, float] = (0.01, 2.0),
                 dt_min: float = 0.001, dt_max: float = 0.1, norm_eps: float = 1e-5,
                 gated_norm: bool = True, project_out: bool = True, external_x: bool = False,
                 init_std: float = 0.02, out_init_std: float = 0.02):
        super().__init__()
        self.n_heads, self.head_dim, self.d_state, self.n_groups = n_heads, head_dim, d_state, n_groups
        self.d_ssm = n_heads * head_dim
        self.chunk_size, self.external_x = chunk_size, external_x
        self.a_init_range, self.dt_min, self.dt_max = a_init_range, dt_min, dt_max
        self.init_std, self.out_init_std = init_std, out_init_std
        self.conv_dim = self.d_ssm + 2 * n_groups * d_state
        x_rows = 0 if external_x else self.d_ssm
        self.in_proj = nn.Linear(d_model, self.d_ssm + x_rows + 2 * n_groups * d_state + n_heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, d_conv))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim))
        self.dt_bias = nn.Parameter(torch.empty(n_heads))
        self.A_log = nn.Parameter(torch.empty(n_heads))
        self.D = nn.Parameter(torch.empty(n_heads))
        self.norm = GatedRMSNorm(self.d_ssm, norm_eps, n_groups) if gated_norm else None
        self.out_proj = nn.Linear(self.d_ssm, d_model, bias=False) if project_out else None

    def reset_parameters(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=self.init_std)
        bound = 1 / math.sqrt(self.conv_weight.shape[1])  # nn.Conv1d's default for depthwise
        nn.init.uniform_(self.conv_weight, -bound, bound)
        nn.init.uniform_(self.conv_bias, -bound, bound)
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.n_heads) * (hi - lo) + lo).clamp(min=1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
            self.A_log.copy_(torch.empty(self.n_heads).uniform_(*self.a_init_range).log())
        nn.init.ones_(self.D)
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.out_proj is not None:
            nn.init.normal_(self.out_proj.weight, std=self.out_init_std)

    def forward(self, u: Tensor, state: dict | None = None, x: Tensor | None = None) -> Tensor:
        """u [b, l, d_model] -> [b, l, d_model] (or [b, l, d_ssm] unprojected).

        `state` {"conv": [b, conv_dim, d_conv-1], "ssm": [b, h, p, n]} is read and updated in place;
        `x` [b, l, d_ssm] is the shared value when `external_x`.
        """
        b, l, _ = u.shape
        gn = self.n_groups * self.d_state
        proj = self.in_proj(u)
        if self.external_x:
            z, bc, dt = proj.split([self.d_ssm, 2 * gn, self.n_heads], dim=-1)
            xbc = torch.cat([x, bc], dim=-1)
        else:
            z, xbc, dt = proj.split([self.d_ssm, self.conv_dim, self.n_heads], dim=-1)
        xbc_t = xbc.transpose(1, 2)
        conv_state = state.get("conv") if state is not None else None
        xbc = causal_conv1d(xbc_t, self.conv_weight, self.conv_bias, conv_state).transpose(1, 2)
        xs, Bm, Cm = xbc.split([self.d_ssm, gn, gn], dim=-1)
        xs = xs.reshape(b, l, self.n_heads, self.head_dim)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        A = -torch.exp(self.A_log.float())
        y, final_state = ssd_scan(xs, dt, A, Bm.reshape(b, l, self.n_groups, self.d_state),
                                  Cm.reshape(b, l, self.n_groups, self.d_state), self.chunk_size,
                                  state.get("ssm") if state is not None else None)
        y = (y + xs * self.D.to(xs.dtype)[:, None]).reshape(b, l, self.d_ssm)
        if state is not None:
            prev = conv_state if conv_state is not None else xbc_t.new_zeros(b, self.conv_dim, self.conv_weight.shape[1] - 1)
            state["conv"] = torch.cat([prev, xbc_t], dim=-1)[..., -(self.conv_weight.shape[1] - 1):]
            state["ssm"] = final_state
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y) if self.out_proj is not None else y


def mamba2_from_config(cfg, layer_id: int) -> Mamba2:
    """The 'M' block mixer of a ModelConfig."""
    return Mamba2(cfg.d_model, cfg.ssm_heads, cfg.ssm_head_dim, cfg.d_state, cfg.n_groups, cfg.d_conv,
                  cfg.chunk_size, cfg.a_init_range, cfg.dt_min, cfg.dt_max, cfg.norm_eps,
                  init_std=cfg.init_std, out_init_std=cfg.out_init_std)
