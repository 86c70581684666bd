"""Mixture of experts: shared expert(s) + top-k of E routed SwiGLU experts (PAPER T4).

Sigmoid router scores; auxiliary-loss-free balancing: a per-expert bias, added to the scores only
to choose experts, is nudged outside the gradient by `rate * sign(mean load - load)`. No token is
dropped: routed experts run as one grouped GEMM over tokens sorted by expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Placement

from parallel.tensor_parallel import local_replicated

from pretrain.model.config import MoEConfig
from pretrain.model.ffn import SwiGLU
from pretrain.model.ops import grouped_mm
from pretrain.model.ops.precision import wide


class MoE(nn.Module):
    def __init__(self, d_model: int, d_expert: int, cfg: MoEConfig, init_std: float = 0.02,
                 out_init_std: float = 0.02):
        super().__init__()
        self.cfg, self.init_std, self.out_init_std = cfg, init_std, out_init_std
        e = cfg.n_experts
        self.router = nn.Linear(d_model, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(e, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(e, d_expert, d_model))
        self.shared = nn.ModuleList(SwiGLU(d_model, d_expert, init_std, out_init_std) for _ in range(cfg.n_shared))
        self.register_buffer("expert_bias", torch.zeros(e), persistent=True)
        # Routed-token counts since the last bias update; zero at every step boundary, so they
        # need no checkpointing.
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.long), persistent=False)
        self.aux_loss: Tensor | None = None
        self.tp_group: dist.ProcessGroup | None = None  # see shard_for_tp

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std)
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.out_init_std)
        for s in self.shared:
            s.reset_parameters()
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()

    def shard_for_tp(self, tp: int, group: dist.ProcessGroup) -> dict[str, Placement]:
        """Shared experts like SwiGLU; routed experts and router replicated (expert parallelism
        shards them). Each TP rank routes only its own 1/tp of the sequence (the tokens sequence
        parallelism gives it), so routed work is not repeated; the replicated weights' gradients
        and the expert loads are partial per rank and summed over `group`."""
        if self.cfg.aux_loss_coef > 0:
            raise ValueError("parallel.tp > 1 needs moe.aux_loss_coef = 0 (the balance loss would be computed per "
                             "TP rank); use the aux-loss-free bias balancing")
        self.tp_group = group
        plan: dict[str, Placement] = {}
        for i, shared in enumerate(self.shared):
            plan.update({f"shared.{i}.{k}": v for k, v in shared.shard_for_tp(tp, group).items()})
        return plan

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [t, d] -> (expert ids [t, k], gate weights [t, k], router scores [t, E])."""
        scores = torch.sigmoid(wide(F.linear(x, local_replicated(self.router.weight, self.tp_group))))
        _, ids = torch.topk(scores + self.expert_bias, self.cfg.top_k, dim=-1)
        gates = scores.gather(-1, ids)
        if self.cfg.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return ids, gates, scores

    def forward(self, x: Tensor) -> Tensor:
        """x [b, l, d]. Under TP, x is every rank's full copy and the output a partial sum."""
        shared = sum(s(x) for s in self.shared) if len(self.shared) else 0
        if self.tp_group is None:
            return self.routed(x) + shared
        rank, size = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
        part = x.shape[1] // size
        routed = self.routed(x[:, rank * part:(rank + 1) * part])
        return F.pad(routed, (0, 0, rank * part, x.shape[1] - (rank + 1) * part)) + shared

    def routed(self, x: Tensor) -> Tensor:
        """The routed experts' output for x [..., d]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, gates, scores = self.route(x)
        counts = torch.bincount(ids.flatten(), minlength=self.cfg.n_experts)
        self.aux_loss = None
        if self.training:
            self.tokens_per_expert += counts
            if self.cfg.aux_loss_coef > 0:
                self.aux_loss = self._aux_loss(scores, counts)
        # sort (token, slot) pairs by expert and run every expert in one grouped GEMM
        order = ids.flatten().argsort(stable=True)
        token_of = order // self.cfg.top_k
        xs = x[token_of]
        offsets = counts.cumsum(0)
        w1, w2, w3 = (local_replicated(w, self.tp_group) for w in (self.w1, self.w2, self.w3))
        h = F.silu(grouped_mm(xs, w1, offsets)) * grouped_mm(xs, w3, offsets)
        ys = grouped_mm(h, w2, offsets) * gates.flatten()[order, None].to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys).reshape(shape)

    def _aux_loss(self, scores: Tensor, counts: Tensor) -> Tensor:
        """Switch-style balance loss: E * sum_e (fraction routed to e) * (mean normalised score of e)."""
        frac = counts.float() / counts.sum().clamp(min=1)
        prob = (scores / scores.sum(-1, keepdim=True)).mean(0)
        return self.cfg.aux_loss_coef * self.cfg.n_experts * (frac * prob).sum()

    def load_stats(self) -> Tensor:
        """Fraction of routed tokens per expert since the last `update_bias` (zeros if none)."""
        total = self.tokens_per_expert.sum()
        return self.tokens_per_expert / total if total > 0 else self.tokens_per_expert.float()

    @torch.no_grad()
    def update_bias(self, global_load: Tensor | None = None) -> None:
        """Aux-loss-free balancing step; call after the optimizer step. Under data parallelism pass
        `global_load`, the counts summed over data-parallel ranks, so every rank applies the same
        update (model code issues no collectives: the trainer knows the right group)."""
        load = (global_load if global_load is not None else self.tokens_per_expert).float()
        if load.sum() > 0:
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load.mean() - load)
        self.tokens_per_expert.zero_()

    def discard_load(self) -> None:
        """Forget the counts of a step that was skipped (non-finite loss), so they do not leak
        into the next bias update."""
        self.tokens_per_expert.zero_()
