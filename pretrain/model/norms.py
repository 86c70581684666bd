"""Normalisations: RMSNorm (pre-norm and final norm), Mamba2's gated group-local RMSNorm, and the
head-wise GroupNorm used on intra-hybrid branch outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from parallel.tensor_parallel import local
from pretrain.model.ops.precision import wide
from pretrain.model.ops.gated_norm import gated_rms_norm, group_rms_norm, sharded_rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over each of `n_groups` slices of `dim`. Under tensor parallelism the input may be
    this rank's slice of the channels: whole groups per rank stay local; one group split over the
    ranks (`tp_group` set) sums its squares over them, so the norm stays exact."""

    def __init__(self, dim: int, eps: float = 1e-5, n_groups: int = 1):
        super().__init__()
        self.eps, self.n_groups, self.group_width = eps, n_groups, dim // n_groups
        self.weight = nn.Parameter(torch.ones(dim))
        self.tp_group = None

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def _local_groups(self, x: Tensor) -> int:
        return x.shape[-1] // self.group_width

    def forward(self, x: Tensor) -> Tensor:
        if self.tp_group is not None:
            return sharded_rms_norm(x, local(self.weight), self.eps, self.group_width, self.tp_group)
        weight = self.weight if isinstance(x, DTensor) else local(self.weight)  # SP norms run on DTensors
        return group_rms_norm(x, weight, self.eps, self._local_groups(x))


class GatedRMSNorm(RMSNorm):
    """Mamba2's output norm: RMSNorm(y * SiLU(z)), group-local so that it shards with the groups."""

    def forward(self, y: Tensor, z: Tensor) -> Tensor:  # type: ignore[override]
        if self.tp_group is not None:
            return sharded_rms_norm(wide(y) * F.silu(wide(z)), local(self.weight), self.eps, self.group_width,
                                    self.tp_group)
        return gated_rms_norm(y, z, local(self.weight), self.eps, self._local_groups(y))


class HeadGroupNorm(nn.Module):
    """GroupNorm with one group per head (mean and variance over each head's channels)."""

    def __init__(self, dim: int, n_heads: int, eps: float = 1e-5):
        super().__init__()
        self.n_heads, self.eps, self.head_width = n_heads, eps, dim // n_heads
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = wide(x).reshape(-1, shape[-1] // self.head_width, self.head_width)  # local heads under TP
        x = F.layer_norm(x, x.shape[-1:], eps=self.eps).reshape(shape)
        weight = local(self.weight)
        return (x * wide(weight) + wide(local(self.bias))).type_as(weight)
