"""Global gradient-norm clipping over parameters that live on different device meshes.

`torch.nn.utils.clip_grad_norm_` runs one foreach norm over all gradients, which DTensor refuses
across meshes (expert-parallel experts are on an efsdp x ep mesh, the rest on the FSDP mesh). Here
each mesh's gradients get their own norm, made global with `full_tensor()`, and the norms combine.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def _by_mesh(grads: list[Tensor]) -> list[list[Tensor]]:
    groups: dict[object, list[Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    return list(groups.values())


def grad_norm(grads: list[Tensor], pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """The gradients' global 2-norm, accumulated in fp32 or wider whatever their dtype (a plain tensor,
    identical on every rank). `pp_group`: the pipeline ranks holding the other stages, whose norms
    combine too (every stage clips alike and agrees on a non-finite norm)."""
    norms = [torch.zeros(())]
    for group in _by_mesh(grads):
        if isinstance(group[0], DTensor):
            norm = torch.nn.utils.get_total_norm(group, 2.0)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        else:  # fp32 at least: bf16 gradients sum in fp32, fp64 ones stay fp64
            dtype = functools.reduce(torch.promote_types, (g.dtype for g in group), torch.float32)
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(group, 2.0, dtype=dtype))))
    total = torch.linalg.vector_norm(torch.stack([n.to(norms[-1].device) for n in norms]))
    if pp_group is not None:
        square = total.double() ** 2
        dist.all_reduce(square, group=pp_group)
        total = square.sqrt().to(total.dtype)
    return total


def clip_coefficient(total: Tensor, max_norm: float) -> float:
    """What clipping to `max_norm` scales gradients of global norm `total` by (1: no clipping)."""
    return min(1.0, max_norm / (float(total) + 1e-6))


def clip_grad_norm_(parameters: Iterable[torch.nn.Parameter], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> Tensor:
    """Clip the gradients' global 2-norm to `max_norm` in place; returns the norm before clipping
    (see `grad_norm`)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    total = grad_norm(grads, pp_group)
    coef = clip_coefficient(total, max_norm)
    if coef < 1:
        for group in _by_mesh(grads):
            torch._foreach_mul_(group, coef)
    return total
