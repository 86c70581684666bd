"""Tensor-parallel building blocks for layers that compute on local shards (Megatron style).

Parameters are DTensors on the TP mesh (so FSDP2, DCP and grad clipping see their global shapes);
a layer that computes by hand takes `local(param)` and marks with these functions where its
activations cross ranks. Each is differentiable and correct for any number of ranks, including 1.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its gradient lands on that shard); a plain tensor as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _summed(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """`t` summed over `group`, out of place. A functional collective, not `dist.all_reduce`: torch
    2.11's compiled autograd Functions got an in-place all-reduce's gradient wrong (a compiled
    tp=2 Mamba2 block's gradients off by up to 270%; tests/parallel/test_model_parallel_layouts.py)."""
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", group))


class _GradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.clone()  # not a view: compile refuses a custom Function that returns its input's view

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _summed(grad, ctx.group), None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return _summed(x, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Every rank's output depends on every rank's input, and each rank holds only its own
        # downstream part of the gradient: the input's gradient is their sum.
        return _summed(grad, ctx.group), None


def grad_all_reduce(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Identity forward; sums the gradient over `group` backward. Put it where a replicated
    activation feeds rank-local work (e.g. Mamba2's B/C feeding this rank's heads)."""
    return _GradAllReduce.apply(x, group)


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Sum over `group`, differentiable (e.g. a norm's sum of squares over a sharded width)."""
    return _AllReduceSum.apply(x, group)


def local_replicated(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """This rank's copy of a parameter replicated over `group` but used for rank-local work (this
    rank's heads or tokens): its gradient, partial on each rank, is summed over `group`."""
    return local(t) if group is None else grad_all_reduce(local(t), group)


def linear(x: Tensor, lin: nn.Linear) -> Tensor:
    """`lin(x)` on local tensors: a TP-sharded weight contributes its shard. Without TP the
    module's own forward runs (a float8 conversion replaces it)."""
    if not isinstance(lin.weight, DTensor):
        return lin(x)
    return F.linear(x, local(lin.weight), None if lin.bias is None else local(lin.bias))


def shard_parameters(module: nn.Module, mesh: DeviceMesh, placements: dict[str, Placement]) -> None:
    """Turn each named parameter (dotted, relative to `module`) into a DTensor with its placement on
    the 1-D `mesh`; every other parameter becomes a replicated DTensor, so that all parameters of
    the model live on one mesh (FSDP2 and grad clipping need that). Works on meta tensors."""
    for name, param in list(module.named_parameters()):
        if isinstance(param, DTensor):
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        placement = placements.get(name, Replicate())
        shard = distribute_tensor(param.data, mesh, [placement], src_data_rank=None)
        setattr(owner, leaf, nn.Parameter(shard, requires_grad=param.requires_grad))
    unknown = set(placements) - {n for n, _ in module.named_parameters()}
    if unknown:
        raise ValueError(f"shard_parameters: {type(module).__name__} has no parameters {sorted(unknown)}")


def gather_sequence(x: Tensor) -> Tensor:
    """A sequence-sharded activation (DTensor Shard(1)) as this rank's full local copy; its
    gradient is declared partial (each rank's local work contributes a part) and reduce-scattered."""
    if not isinstance(x, DTensor):
        return x
    return x.redistribute(placements=[Replicate()]).to_local(grad_placements=[Partial()])


def reduce_scatter_sequence(y: Tensor, mesh: DeviceMesh) -> DTensor:
    """A rank's partial output (e.g. of a row-parallel projection) summed over the TP ranks and
    sharded on the sequence (dim 1) again; the gradient is gathered back."""
    return DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(placements=[Shard(1)])


def sequence_parallel_region(module: nn.Module, mesh: DeviceMesh) -> None:
    """Hooks that make `module` (which computes on local tensors and returns a partial sum) take
    and return sequence-sharded DTensors: all-gather in, reduce-scatter out."""
    def gather_input(_module, args):
        return (gather_sequence(args[0]), *args[1:])

    def scatter_output(_module, _args, out):
        return reduce_scatter_sequence(out, mesh)

    module.register_forward_pre_hook(gather_input)
    module.register_forward_hook(scatter_output)
