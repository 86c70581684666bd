"""SwiGLU feed-forward: w2(SiLU(w1 x) * w3 x)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, init_std: float = 0.02, out_init_std: float = 0.02):
        super().__init__()
        self.init_std, self.out_init_std = init_std, out_init_std
        self.w1 = nn.Linear(d_model, d_ffn, bias=False)
        self.w3 = nn.Linear(d_model, d_ffn, bias=False)
        self.w2 = nn.Linear(d_ffn, d_model, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w1.weight, std=self.init_std)
        nn.init.normal_(self.w3.weight, std=self.init_std)
        nn.init.normal_(self.w2.weight, std=self.out_init_std)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
