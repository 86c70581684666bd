"""Expert parallelism: each of the `ep` ranks of a group holds E/ep of a layer's experts and
computes every row routed to them by any rank of the group.

Rows travel with `all_to_all_single`: first the per-expert counts (so every rank knows what it
will receive), then the rows, and after the experts the same exchange in reverse. The exchange is
a small autograd function whose backward is the reverse all-to-all (torch's
`all_to_all_single_autograd` gave right gradients on gloo but aborted processes at exit). Every
exchange is the functional collective, which returns a new tensor rather than writing into one:
selective checkpointing keeps its output (parallel/activation_checkpoint.py), so recomputing a
checkpointed block does not send the rows again.
Knows nothing about the model: it moves rows sorted by expert and shards stacked expert weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def _exchange(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """`all_to_all_single` of the rows of `x` (not differentiable)."""
    c10d = torch.ops._c10d_functional
    return c10d.wait_tensor(c10d.all_to_all_single(x.contiguous(), out_splits, in_splits, group.group_name))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
        ctx.splits, ctx.group = (in_splits, out_splits), group
        return _exchange(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # the rows came from where the gradient must go: the same exchange with the splits swapped
        back_out, back_in = ctx.splits
        return _exchange(grad, back_out, back_in, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def ep_grad_mean(w: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Identity forward; divides the gradient by the ep size backward. An expert's gradient sums
    the rows of every ep rank's batch, and FSDP then averages over efsdp only: with this the
    expert weights are averaged over all data ranks like every other parameter. (FSDP2's
    set_gradient_divide_factor would do it, but divides twice on a 1-rank efsdp mesh in fp64 and
    needs PREMUL_SUM, which gloo lacks.)"""
    return _ScaleGrad.apply(w, 1.0 / dist.get_world_size(group))


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> Tensor:
    """Rows `x` [sum(in_splits), ...]: in_splits[r] rows go to rank r, out_splits[r] come from it.
    Differentiable (the backward is the reverse exchange)."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


@dataclass
class DispatchHandle:
    """What `combine_tokens` needs to send the experts' rows back where they came from."""

    order: Tensor  # received rows (grouped by source rank) -> rows grouped by local expert
    sent: list[int]  # rows this rank sent to each rank
    received: list[int]  # rows this rank received from each rank
    group: dist.ProcessGroup


def dispatch_tokens(xs: Tensor, counts: Tensor, group: dist.ProcessGroup) -> tuple[Tensor, Tensor, DispatchHandle]:
    """xs [t, d] sorted by global expert with counts [E] rows per expert -> (the rows of every
    group rank for this rank's experts, sorted by local expert; their counts [E/ep]; a handle)."""
    ep = dist.get_world_size(group)
    local_experts = counts.numel() // ep
    send_counts = counts.view(ep, local_experts)
    recv_counts = _exchange(send_counts, [1] * ep, [1] * ep, group)  # [source rank, local expert]
    sent, received = send_counts.sum(1).tolist(), recv_counts.sum(1).tolist()
    rows = all_to_all(xs, received, sent, group)
    expert_of_row = torch.arange(local_experts, device=xs.device).repeat(ep).repeat_interleave(recv_counts.flatten())
    order = expert_of_row.argsort(stable=True)
    return rows[order], recv_counts.sum(0), DispatchHandle(order, sent, received, group)


def combine_tokens(ys: Tensor, handle: DispatchHandle) -> Tensor:
    """The experts' rows (in `dispatch_tokens`' output order) back on the ranks and in the order
    the rows were dispatched from."""
    by_source = torch.empty_like(ys).index_copy(0, handle.order, ys)
    return all_to_all(by_source, handle.sent, handle.received, handle.group)


def shard_experts(module: nn.Module, mesh: DeviceMesh, names: tuple[str, ...] = ("w1", "w2", "w3")) -> None:
    """Make `module`'s stacked expert weights [E, ...] DTensors sharded on dim 0 over the 1-D `mesh`
    (E/ep experts per rank, global shapes kept for checkpoints). Works on meta tensors."""
    ep = mesh.size()
    for name in names:
        param = getattr(module, name)
        if param.shape[0] % ep:
            raise ValueError(f"parallel.ep={ep} must divide the number of experts {param.shape[0]} "
                             "(model moe.n_experts); change parallel.ep")
        if isinstance(param, DTensor):
            raise ValueError(f"shard_experts: {name} is already a DTensor; apply expert parallelism first")
        shard = distribute_tensor(param.data, mesh, [Shard(0)], src_data_rank=None)
        setattr(module, name, nn.Parameter(shard, requires_grad=param.requires_grad))
