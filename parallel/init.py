"""Materialise a model that was built and sharded on the meta device.

A rank never holds the whole model: every init step of the model's `init_plan()` runs on a full
copy of one module (taken from an unsharded meta `template`), and each rank keeps its own shard
of the result. Steps run in the plan's order on the target device, so the parameters are exactly
those `init_weights()` gives an unsharded model there - for every number of ranks and every
layout - while peak memory is the shards plus the largest module (the embedding), not the model.
"""
from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor


@torch.no_grad()
def init_sharded(model: nn.Module, template: nn.Module, device: torch.device | str) -> None:
    """Allocate `model`'s (possibly DTensor) parameters on `device` and initialise them.

    `model` and `template` expose `init_plan()` -> [(module, init)] with the same steps; the
    model may be wrapped (FSDP, activation checkpointing, compile), the template must be whole.
    """
    model.to_empty(device=device)
    steps = zip(template.init_plan(), model.init_plan(), strict=True)
    for (full_module, init), (target_module, _) in steps:
        full_module.to_empty(device=device)
        init()
        for name, full in itertools.chain(full_module.named_parameters(), full_module.named_buffers()):
            _copy_into(_tensor(target_module, name), full)
        full_module.to_empty(device="meta")  # release it before the next step


def _tensor(module: nn.Module, name: str) -> Any:
    owner, _, leaf = name.rpartition(".")
    return getattr(module.get_submodule(owner) if owner else module, leaf)


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    if isinstance(target, DTensor):
        # Every rank computed the same full tensor: take the local shard without communication.
        full = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target = target.to_local()
    target.copy_(full)
