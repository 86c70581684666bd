"""Mixed precision without FSDP (one process): the model computes with bf16 parameters, as FSDP2's
MixedPrecisionPolicy has it compute after its all-gather, instead of autocast's casts per op.

Under autocast the residual stream, the norms' outputs and the embedding stay fp32, so every
linear casts its activation input again (the profile's `aten::_to_copy`, 15% of a 1B step); with
bf16 parameters the activations are bf16 end to end and the model computes exactly like the
FSDP2 layout does on several GPUs. The fp32 parameters stay the optimizer's master copy.

Two ways to hold the bf16 parameters:
- `cast_parameters`: differentiable casts made on entry, so gradients land on the masters in fp32
  (a cast each way per parameter and step);
- `WorkingCopies`: bf16 copies kept across steps; gradients land on them in bf16 and the optimizer
  (`pretrain.optim.AdamWWithCopies`) reads them and rewrites the copies in the same pass. Same
  gradient values: autograd computes a bf16 parameter's gradient in bf16 either way, the cast only
  widens it. Only accumulation over micro-batches would round, so `accumulate` folds each
  micro-batch's gradients into fp32 on the masters.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch import Tensor

Slot = tuple[nn.Module, str, nn.Parameter]


def _slots(model: nn.Module, dtype: torch.dtype) -> list[Slot]:
    """Every (module, name, parameter) whose parameter is floating and not already `dtype`; a tied
    parameter appears once per module holding it."""
    return [(module, name, param) for module in model.modules() for name, param in module._parameters.items()
            if param is not None and param.is_floating_point() and param.dtype != dtype]


@contextlib.contextmanager
def _swapped(slots: list[Slot], copy_of: dict[int, Tensor]) -> Iterator[None]:
    try:
        for module, name, param in slots:
            # _parameters holds the copy directly: setattr would refuse a non-Parameter
            module._parameters[name] = copy_of[id(param)]
        yield
    finally:
        for module, name, param in slots:
            module._parameters[name] = param


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Inside the block, `model`'s floating parameters are `dtype` copies made on entry (tied
    parameters share one copy). Run forward AND backward inside it: activation checkpointing
    recomputes the forward during backward and must see the same copies."""
    slots = _slots(model, dtype)
    copies = {id(param): param.to(dtype) for _, _, param in slots}
    return _swapped(slots, copies)


class WorkingCopies:
    """`dtype` copies of `model`'s floating parameters kept across steps (tied parameters share
    one), leaves of autograd: the model computes with them inside `swapped()` and their `.grad`
    is what the optimizer reads. Whoever changes a master (the optimizer, a checkpoint load) calls
    `sync` or writes the copy itself."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self._slots = _slots(model, dtype)
        self._copy_of: dict[int, Tensor] = {}
        self.masters: list[nn.Parameter] = []
        for _, _, param in self._slots:
            if id(param) not in self._copy_of:
                self._copy_of[id(param)] = param.detach().to(dtype).requires_grad_(param.requires_grad)
                self.masters.append(param)

    def swapped(self) -> contextlib.AbstractContextManager:
        """Run forward and backward inside (see `cast_parameters`)."""
        return _swapped(self._slots, self._copy_of)

    def of(self, master: Tensor) -> Tensor | None:
        """The working copy of `master` (None: it has none, e.g. it already is `dtype`)."""
        return self._copy_of.get(id(master))

    def grad(self, master: Tensor) -> Tensor | None:
        """The gradient the optimizer applies to `master`: its copy's (one micro-batch), else its own
        (accumulated in fp32 by `accumulate`, or a parameter without a copy)."""
        copy = self.of(master)
        return copy.grad if copy is not None and copy.grad is not None else master.grad

    @torch.no_grad()
    def accumulate(self) -> None:
        """Move the copies' gradients onto the masters in fp32 (after each micro-batch's backward
        when there are several): what autograd's accumulation through a cast would hold."""
        for master in self.masters:
            copy = self._copy_of[id(master)]
            if copy.grad is None:
                continue
            if master.grad is None:
                master.grad = copy.grad.to(master.dtype)
            else:
                master.grad += copy.grad
            copy.grad = None

    def zero_grad(self) -> None:
        for copy in self._copy_of.values():
            copy.grad = None

    @torch.no_grad()
    def sync(self) -> None:
        """Copies <- masters (after the masters were loaded or updated)."""
        for master in self.masters:
            self._copy_of[id(master)].copy_(master)
