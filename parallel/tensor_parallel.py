"""Tensor-parallel building blocks for layers that compute on local shards (Megatron style).

Parameters are DTensors on the TP mesh (so FSDP2, DCP and grad clipping see their global shapes);
a layer that computes by hand takes `local(param)` and marks with these functions where its
activations cross ranks. Each is differentiable and correct for any number of ranks, including 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its gradient lands on that shard); a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's output depends on every rank's input, and each rank holds only its own
        # downstream part of the gradient: the input's gradient is their sum.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def grad_all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Identity forward; sums the gradient over `group` backward. Put it where a replicated
    activation feeds rank-local work (e.g. Mamba2's B/C feeding this rank's heads)."""
    return _GradAllReduce.apply(x, group)


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over `group`, differentiable (e.g. a norm's sum of squares over a sharded width)."""
    return _AllReduceSum.apply(x, group)
