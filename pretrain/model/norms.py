"""Normalisations: RMSNorm (pre-norm and final norm), Mamba2's gated group-local RMSNorm, and the
head-wise GroupNorm used on intra-hybrid branch outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.ops.gated_norm import gated_rms_norm, group_rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, n_groups: int = 1):
        super().__init__()
        self.eps, self.n_groups = eps, n_groups
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return group_rms_norm(x, self.weight, self.eps, self.n_groups)


class GatedRMSNorm(RMSNorm):
    """Mamba2's output norm: RMSNorm(y * SiLU(z)), group-local so that it shards with the groups."""

    def forward(self, y: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        return gated_rms_norm(y, z, self.weight, self.eps, self.n_groups)


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head (mean and variance over each head's channels)."""

    def __init__(self, dim: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.eps = n_heads, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.float().reshape(-1, self.n_heads, shape[-1] // self.n_heads)
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps).reshape(shape)
        return (x * self.weight.float() + self.bias.float()).type_as(self.weight)
