"""Grouped-query attention with RoPE; global or sliding-window with attention sinks; KV cache."""

from __future__ import annotations


import torch
from torch import Tensor, nn

from torch.distributed.tensor import Placement, Shard

from parallel.context_parallel import all_gather_sequence
from parallel.tensor_parallel import linear
from pretrain.model.config import RopeConfig
from pretrain.model.ops import attention
from pretrain.model.rope import apply_rope, rope_cos_sin, rope_inv_freq


class Attention(nn.Module):
    """`n_heads` query heads of `qk_head_dim`, `n_kv_heads` K/V heads (V of `v_head_dim`).

    With `project_out=False` the module returns the heads' output [b, l, n_heads * v_head_dim]
    unprojected (the intra-hybrid mixer projects and fuses it itself).
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, qk_head_dim: int, rope: RopeConfig,
                 v_head_dim: int | None = None, window: int | None = None, n_sink: int = 0,
                 project_out: bool = True, init_std: float = 0.02, out_init_std: float = 0.02):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.qk_head_dim, self.v_head_dim = qk_head_dim, v_head_dim or qk_head_dim
        self.window, self.n_sink, self.rope = window, n_sink, rope
        self.init_std, self.out_init_std = init_std, out_init_std
        self.q_proj = nn.Linear(d_model, n_heads * qk_head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * qk_head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.v_head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.v_head_dim, d_model, bias=False) if project_out else None
        self.cp_group = None  # context parallelism: keys/values are gathered from these ranks

    def reset_parameters(self) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=self.init_std)
        if self.o_proj is not None:
            nn.init.normal_(self.o_proj.weight, std=self.out_init_std)

    def shard_for_tp(self, tp: int, group=None) -> dict[str, Placement]:
        """Heads split over the TP ranks: Q/K/V column-parallel, the output row-parallel."""
        if self.n_kv_heads % tp:
            raise ValueError(f"parallel.tp={tp} must divide the attention's n_kv_heads={self.n_kv_heads} "
                             "(each rank keeps whole K/V heads); choose a tp that divides it")
        plan: dict[str, Placement] = {f"{p}_proj.weight": Shard(0) for p in "qkv"}
        if self.o_proj is not None:
            plan["o_proj.weight"] = Shard(1)
        return plan

    def values(self, x: Tensor) -> Tensor:
        """V heads [b, l, n_kv_heads, v_head_dim] (shared with the Mamba branch under value sharing)."""
        return linear(x, self.v_proj).unflatten(-1, (-1, self.v_head_dim))

    def forward(self, x: Tensor, positions: Tensor, state: dict | None = None, v: Tensor | None = None) -> Tensor:
        """x [b, l, d]; positions [l] absolute; `state` (a dict) is the KV cache, updated in place."""
        b, l = x.shape[:2]
        q = linear(x, self.q_proj).view(b, l, -1, self.qk_head_dim).transpose(1, 2)  # local heads under TP
        k = linear(x, self.k_proj).view(b, l, -1, self.qk_head_dim).transpose(1, 2)
        v = (v if v is not None else self.values(x)).transpose(1, 2)
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.qk_head_dim, self.rope, positions.device))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_pos = positions
        if self.cp_group is not None:  # this rank's queries see every rank's keys, at their positions
            k, v = (all_gather_sequence(t, self.cp_group, dim=2) for t in (k, v))
            k_pos = all_gather_sequence(positions, self.cp_group, dim=0)
        if state is not None:
            if "k" in state:
                k = torch.cat([state["k"], k], dim=2)
                v = torch.cat([state["v"], v], dim=2)
                k_pos = torch.cat([state["pos"], positions])
            state["k"], state["v"], state["pos"] = k, v, k_pos
            if self.window is not None:  # later queries see only sinks + window: drop the rest
                keep = (k_pos < self.n_sink) | (k_pos > positions[-1] - self.window)
                state["k"], state["v"], state["pos"] = k[:, :, keep], v[:, :, keep], k_pos[keep]
        y = attention(q, k, v, positions, k_pos, self.window, self.n_sink)
        y = y.transpose(1, 2).flatten(2)
        return linear(y, self.o_proj) if self.o_proj is not None else y


def attention_from_config(cfg, sliding: bool, layer_id: int) -> Attention:
    """The 'A' / 'S' block mixer of a ModelConfig."""
    rope = RopeConfig(theta=cfg.swa_rope_theta, factor=None) if sliding else cfg.rope
    return Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, rope,
                     window=cfg.window if sliding else None, n_sink=cfg.n_sink if sliding else 0,
                     init_std=cfg.init_std, out_init_std=cfg.out_init_std)
