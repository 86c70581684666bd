"""Materialise a model that was built and sharded on the meta device.

A rank never holds the whole model: every init step of the model's `init_plan()` runs on a full
copy of one module (taken from an unsharded meta `template`), and each rank keeps its own shard
of the result. Steps run in the plan's order on the target device, so the parameters are exactly
those `init_weights()` gives an unsharded model there - for every number of ranks and every
layout - while peak memory is the shards plus the largest module (the embedding), not the model.

Every rank draws the full tensors itself, so all ranks must draw the same numbers. CUDA's random
kernels depend on the GPU model (their launch grid follows the SM count), so ranks on different
GPU models would not: a checksum of everything drawn is compared across ranks at the end.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


class InitMismatchError(RuntimeError):
    """Ranks drew different initial weights (mixed GPU models, or a rank seeded differently)."""


@torch.no_grad()
def init_sharded(model: nn.Module, template: nn.Module, device: torch.device | str) -> None:
    """Allocate `model`'s (possibly DTensor) parameters on `device` and initialise them.

    `model` and `template` expose `init_plan()` -> [(module, init)] with the same steps (the
    model's module None where it lacks that module: a pipeline stage); the model may be wrapped (FSDP, activation checkpointing, compile), the template must be whole.
    Raises if a parameter or buffer of `model` is in no step, or if the ranks drew differently.
    """
    model.to_empty(device=device)
    uncovered = {id(t): name for name, t in itertools.chain(model.named_parameters(), model.named_buffers())}
    sharded = dist.is_initialized() and any(isinstance(p, DTensor) for p in model.parameters())
    checksum = torch.zeros((), dtype=torch.float64, device=device) if sharded else None
    for (full_module, init), (target_module, _) in zip(template.init_plan(), model.init_plan(), strict=True):
        full_module.to_empty(device=device)
        init()
        full = list(itertools.chain(full_module.named_parameters(), full_module.named_buffers()))
        if checksum is not None:  # of everything drawn, also what a pipeline stage does not keep
            for _, tensor in full:
                checksum += tensor.sum(dtype=torch.float64)
        if target_module is not None:  # None: a pipeline stage lacks the module, it only draws like the whole model
            for target in _copy_module(full, target_module):
                uncovered.pop(id(target), None)
        full_module.to_empty(device="meta")  # release it before the next step
    if uncovered:
        raise RuntimeError(f"init_sharded: no init_plan step covers {sorted(uncovered.values())}")
    if checksum is not None:
        _check_ranks_agree(checksum)


def _copy_module(full: list[tuple[str, torch.Tensor]], target_module: nn.Module) -> list[torch.Tensor]:
    """Copy each full tensor (named relative to the module) or its shard into the target module;
    returns the targets written."""
    written = []
    for name, tensor in full:
        owner, _, leaf = name.rpartition(".")
        target = getattr(target_module.get_submodule(owner) if owner else target_module, leaf)
        copy_full_into(target, tensor)
        written.append(target)
    return written


def copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the global tensor `full` into `target`: all of it, or this rank's shard of a DTensor.
    Every rank holds the same `full`, so the shard is taken without communication."""
    if isinstance(target, DTensor):
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(full)


def _check_ranks_agree(checksum: torch.Tensor) -> None:
    extremes = torch.stack([checksum, -checksum])
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes[0] != -extremes[1]:
        raise InitMismatchError(
            f"init_sharded: ranks drew different initial weights (checksums {-extremes[1].item():.6g} to "
            f"{extremes[0].item():.6g}); run every rank on the same GPU model and seed")
