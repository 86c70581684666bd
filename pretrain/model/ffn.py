"""SwiGLU feed-forward: w2(SiLU(w1 x) * w3 x)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Placement, Shard

from parallel.tensor_parallel import linear


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

    def shard_for_tp(self, tp: int, group=None) -> dict[str, Placement]:
        """Hidden units split over the TP ranks: w1/w3 column-parallel, w2 row-parallel."""
        if self.w1.weight.shape[0] % tp:
            raise ValueError(f"parallel.tp={tp} must divide the FFN width {self.w1.weight.shape[0]} (model.overrides."
                             "d_ffn, or moe.d_expert for MoE experts); choose a tp that divides it")
        return {"w1.weight": Shard(0), "w3.weight": Shard(0), "w2.weight": Shard(1)}

    def forward(self, x: Tensor, gate_up: Tensor | None = None) -> Tensor:
        """`gate_up`: [w1; w3] concatenated (a static decoder's snapshot): one GEMV for both."""
        if gate_up is None:
            return linear(F.silu(linear(x, self.w1)) * linear(x, self.w3), self.w2)
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return linear(F.silu(gate) * up, self.w2)
