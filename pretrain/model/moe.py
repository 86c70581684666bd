"""Mixture of experts: shared expert(s) + top-k of E routed SwiGLU experts (PAPER T4).

Three parts, so the routed experts can live on their own mesh (expert parallelism):
- `Router`: sigmoid scores; auxiliary-loss-free balancing adds a per-expert bias (nudged outside
  the gradient by `rate * sign(mean load - load)`) to the scores only to choose experts.
- `GroupedExperts`: the E experts' stacked weights, run as one grouped GEMM over rows sorted by
  expert.
- dispatch / combine (`MoE.routed`): sort the (token, slot) pairs by expert, hand them to the
  experts - on this rank, or over the expert-parallel ranks with all-to-all - and sum the gated
  outputs back per token. No token is ever dropped (no capacity limit).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import Placement

from parallel.expert_parallel import combine_tokens, dispatch_tokens, ep_grad_mean
from parallel.tensor_parallel import local_replicated

from pretrain.model.config import MoEConfig
from pretrain.model.ffn import SwiGLU
from pretrain.model.legacy import convert, moe_splits
from pretrain.model.ops import grouped_mm
from pretrain.model.ops.precision import wide


class Router(nn.Module):
    """Top-k of E experts per token by sigmoid score + balancing bias; gates from the scores alone."""

    def __init__(self, d_model: int, n_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.tp_group: dist.ProcessGroup | None = None  # see MoE.shard_for_tp

    def forward(self, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [t, d] -> (expert ids [t, k], gate weights [t, k], router scores [t, E])."""
        scores = torch.sigmoid(wide(F.linear(x, local_replicated(self.weight, self.tp_group))))
        _, ids = torch.topk(scores + bias, self.top_k, dim=-1)
        gates = scores.gather(-1, ids)
        if self.top_k > 1:
            gates = gates / gates.sum(-1, keepdim=True)
        return ids, gates, scores


class GroupedExperts(nn.Module):
    """E SwiGLU experts as stacked weights [E, d, h]; under expert parallelism each rank holds a
    contiguous slice of them (a DTensor sharded on dim 0) and runs only those."""

    def __init__(self, n_experts: int, d_model: int, d_expert: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w3 = nn.Parameter(torch.empty(n_experts, d_model, d_expert))
        self.w2 = nn.Parameter(torch.empty(n_experts, d_expert, d_model))
        self.tp_group: dist.ProcessGroup | None = None  # replicated over TP, each rank runs its own tokens
        self.ep_group: dist.ProcessGroup | None = None  # see parallel.expert_parallel.shard_experts

    def forward(self, xs: Tensor, counts: Tensor) -> Tensor:
        """xs [t, d] sorted by (local) expert, counts [local E] rows per expert -> [t, d]."""
        w1, w2, w3 = (self._local(w) for w in (self.w1, self.w2, self.w3))
        offsets = counts.cumsum(0)
        h = F.silu(grouped_mm(xs, w1, offsets)) * grouped_mm(xs, w3, offsets)
        return grouped_mm(h, w2, offsets)

    def _local(self, w: Tensor) -> Tensor:
        w = local_replicated(w, self.tp_group)
        return w if self.ep_group is None else ep_grad_mean(w, self.ep_group)


class MoE(nn.Module):
    def __init__(self, d_model: int, d_expert: int, cfg: MoEConfig, init_std: float = 0.02,
                 out_init_std: float = 0.02):
        super().__init__()
        self.cfg, self.init_std, self.out_init_std = cfg, init_std, out_init_std
        e = cfg.n_experts
        self.router = Router(d_model, e, cfg.top_k)
        self.experts = GroupedExperts(e, d_model, d_expert)
        self.shared = nn.ModuleList(SwiGLU(d_model, d_expert, init_std, out_init_std) for _ in range(cfg.n_shared))
        self.register_buffer("expert_bias", torch.zeros(e), persistent=True)
        # Routed-token counts since the last bias update; zero at every step boundary, so they
        # need no checkpointing.
        self.register_buffer("tokens_per_expert", torch.zeros(e, dtype=torch.long), persistent=False)
        # Rows this rank's experts computed since the last bias update (under expert parallelism:
        # what the all-to-all brought it; the capacity a fixed-size buffer would need).
        self.register_buffer("tokens_received", torch.zeros((), dtype=torch.long), persistent=False)
        self.aux_loss: Tensor | None = None
        self.tp_group: dist.ProcessGroup | None = None  # see shard_for_tp
        self.ep_group: dist.ProcessGroup | None = None  # set with the experts' (expert parallelism)
        self.register_load_state_dict_pre_hook(_nest_expert_weights_on_load)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.init_std)
        nn.init.normal_(self.experts.w1, std=self.init_std)
        nn.init.normal_(self.experts.w3, std=self.init_std)
        nn.init.normal_(self.experts.w2, std=self.out_init_std)
        for s in self.shared:
            s.reset_parameters()
        self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
        self.tokens_received.zero_()

    def shard_for_tp(self, tp: int, group: dist.ProcessGroup) -> dict[str, Placement]:
        """Shared experts like SwiGLU; routed experts and router replicated (expert parallelism
        shards the experts over other ranks). Each TP rank routes only its own 1/tp of the
        sequence (the tokens sequence parallelism gives it), so routed work is not repeated; the
        replicated weights' gradients and the expert loads are partial per rank and summed over
        `group`."""
        if self.cfg.aux_loss_coef > 0:
            raise ValueError("parallel.tp > 1 needs model.overrides.moe.aux_loss_coef=0 (the balance loss would be "
                             "computed per TP rank); use the aux-loss-free bias balancing")
        self.tp_group = self.router.tp_group = self.experts.tp_group = group
        plan: dict[str, Placement] = {}
        for i, shared in enumerate(self.shared):
            plan.update({f"shared.{i}.{k}": v for k, v in shared.shard_for_tp(tp, group).items()})
        return plan

    def forward(self, x: Tensor) -> Tensor:
        """x [b, l, d]. Under TP, x is every rank's full copy and the output a partial sum."""
        shared = sum(s(x) for s in self.shared) if len(self.shared) else 0
        if self.tp_group is None:
            return self.routed(x) + shared
        rank, size, length = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group), x.shape[1]
        start, end = rank * length // size, (rank + 1) * length // size  # covers every token (decoding: 1)
        routed = self.routed(x[:, start:end])
        return F.pad(routed, (0, 0, start, length - end)) + shared

    def routed(self, x: Tensor) -> Tensor:
        """The routed experts' output for x [..., d]."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, gates, scores = self.router(x, self.expert_bias)
        # a scatter, not bincount: its output shape does not depend on the data (no graph break)
        counts = torch.zeros(self.cfg.n_experts, dtype=torch.long, device=x.device).scatter_add_(
            0, ids.flatten(), torch.ones_like(ids.flatten()))
        self.aux_loss = None
        if self.training and self.cfg.aux_loss_coef > 0:
            self.aux_loss = self._aux_loss(scores, counts)
        # dispatch: (token, slot) pairs sorted by expert, one row each
        order = ids.flatten().argsort(stable=True)
        token_of = order // self.cfg.top_k
        xs = x[token_of]
        if self.ep_group is None:
            ys, received = self.experts(xs, counts), xs.shape[0]
        else:
            local_xs, local_counts, handle = dispatch_tokens(xs, counts, self.ep_group)
            ys, received = combine_tokens(self.experts(local_xs, local_counts), handle), local_xs.shape[0]
        if self.training:
            count_routed(self.tokens_per_expert, self.tokens_received, counts, received)
        # combine: gate each row, put the rows back in (token, slot) order and sum each token's k rows.
        # `order` is a permutation: a copy, not index_add's atomic adds (bf16 atomics ran at ~0.5 TB/s
        # on an H200, and their order varied from run to run for k > 1)
        ys = ys * gates.flatten()[order, None].to(x.dtype)
        pairs = ys.new_empty(ys.shape).index_copy(0, order, ys)
        return pairs.view(-1, self.cfg.top_k, shape[-1]).sum(1).reshape(shape)

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
        self.discard_load()

    def discard_load(self) -> None:
        """Forget the counts of a step that was skipped (non-finite loss), so they do not leak
        into the next bias update."""
        self.tokens_per_expert.zero_()
        self.tokens_received.zero_()


@torch.library.custom_op("pretrain::count_routed", mutates_args=("tokens_per_expert", "tokens_received"))
def count_routed(tokens_per_expert: Tensor, tokens_received: Tensor, counts: Tensor, received: int) -> None:
    """Add one forward's routing to the MoE's load counters, unless activation checkpointing is
    running that forward again in backward (it must not count twice). An opaque op: the check
    runs when the op runs, not when compile traces it, so a compiled block's forward and its
    recompute are one graph that saves the same tensors (a Python-level flag would make them two)."""
    if torch._C._current_graph_task_id() != -1:  # inside backward: a recompute
        return
    tokens_per_expert.add_(counts)
    tokens_received.add_(received)


@count_routed.register_fake
def _(tokens_per_expert: Tensor, tokens_received: Tensor, counts: Tensor, received: int) -> None:
    return None


def _nest_expert_weights_on_load(module: MoE, state: dict, prefix: str, *_args) -> None:
    """State dicts saved before the split kept the expert weights on the MoE itself (`w1`, ...)."""
    convert(state, moe_splits(prefix, module.cfg.n_experts))
