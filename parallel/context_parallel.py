"""Context parallelism: each of `cp` ranks holds a part of every sequence.

Load balance: the sequence is cut into 2*cp chunks and rank r keeps chunks r and 2cp-1-r
(head-tail order), so every rank has the same causal attention work. Layers see their tokens'
absolute positions, so attention needs only the keys/values of the other ranks with their
positions (`all_gather_sequence`), and a scan switches from sequence shards to head shards of the
full sequence and back (`sequence_to_heads` / `heads_to_sequence`, Megatron-core's approach).
Every collective here is differentiable.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def shard_index(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> Tensor:
    """The positions rank `rank` holds: chunks rank and 2cp-1-rank of 2cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"context parallelism needs the sequence length ({seq_len}) to be a multiple of "
                         f"2 * parallel.cp = {2 * cp}; change data.seq_len or parallel.cp")
    chunk = seq_len // (2 * cp)
    ar = torch.arange(chunk, device=device)
    return torch.cat([rank * chunk + ar, (2 * cp - 1 - rank) * chunk + ar])


def _rank_order(seq_len: int, cp: int, device: torch.device) -> Tensor:
    """Positions of the concatenation of every rank's shard, in rank order."""
    return torch.cat([shard_index(seq_len, cp, r, device) for r in range(cp)])


def _group_info(group: dist.ProcessGroup) -> tuple[int, int]:
    return dist.get_rank(group), dist.get_world_size(group)


class _AllToAll(torch.autograd.Function):
    """Split `x` into `size` parts along `scatter_dim`, send part j to rank j, concatenate what
    arrives along `gather_dim` (in rank order). Its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.args = (group, scatter_dim, gather_dim)
        size = dist.get_world_size(group)
        send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)
        return torch.cat(recv.unbind(0), dim=gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group, scatter_dim, gather_dim = ctx.args
        return _AllToAll.apply(grad, group, gather_dim, scatter_dim), None, None, None


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's `x` along `dim` in rank order; gradient: the sum of all ranks'
    gradients for this rank's part (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup, dim: int) -> Tensor:
        ctx.args = (group, dim)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group, dim = ctx.args
        parts = grad.chunk(dist.get_world_size(group), dim=dim)
        out = torch.empty_like(parts[0], memory_format=torch.contiguous_format)
        dist.reduce_scatter_tensor(out, torch.cat(parts).contiguous(), group=group)  # rank-major along dim 0
        return out, None, None


def all_gather_sequence(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """Every rank's shard of `x` along `dim`, concatenated in rank order (pair it with the
    gathered positions; use `to_natural_order` when order matters)."""
    return _AllGather.apply(x, group, dim)


def to_natural_order(x: Tensor, group: dist.ProcessGroup, dim: int = 1) -> Tensor:
    """A rank-order concatenation of the shards (length L along `dim`) in position order."""
    order = _rank_order(x.shape[dim], dist.get_world_size(group), x.device)
    return x.index_select(dim, torch.argsort(order))


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """[b, l/cp, h, ...] (this rank's tokens, all local heads) -> [b, l, h/cp, ...] (every token in
    position order, this rank's share of the heads)."""
    return to_natural_order(_AllToAll.apply(x, group, 2, 1), group)


def heads_to_sequence(y: Tensor, group: dist.ProcessGroup) -> Tensor:
    """The inverse of `sequence_to_heads`."""
    order = _rank_order(y.shape[1], dist.get_world_size(group), y.device)
    return _AllToAll.apply(y.index_select(1, order), group, 1, 2)


def head_slice(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """This rank's share of a per-head tensor (dim 0 in head order), matching `sequence_to_heads`."""
    rank, size = _group_info(group)
    return t.chunk(size, dim=0)[rank]
