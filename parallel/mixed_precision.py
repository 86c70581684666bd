"""Mixed precision without FSDP (one process): cast every parameter to the compute dtype once per
step, as FSDP2's MixedPrecisionPolicy does when it all-gathers, instead of autocast's casts per op.

Under autocast the residual stream, the norms' outputs and the embedding stay fp32, so every
linear casts its activation input again (the profile's `aten::_to_copy`, 15% of a 1B step); with
bf16 parameters the activations are bf16 end to end and the model computes exactly like the
FSDP2 layout does on several GPUs. The fp32 parameters stay the optimizer's master copy: the casts
are differentiable, so gradients land on them in fp32.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn


@contextlib.contextmanager
def cast_parameters(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Inside the block, `model`'s floating parameters are `dtype` copies made on entry (tied
    parameters share one copy). Run forward AND backward inside it: activation checkpointing
    recomputes the forward during backward and must see the same copies."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    copies: dict[int, torch.Tensor] = {}
    try:
        for module in model.modules():
            for name, param in module._parameters.items():
                if param is None or not param.is_floating_point() or param.dtype == dtype:
                    continue
                if id(param) not in copies:
                    copies[id(param)] = param.to(dtype)
                # _parameters holds the copy directly: setattr would refuse a non-Parameter
                module._parameters[name] = copies[id(param)]
                swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
