"""AdamW over fp32 masters whose gradients arrive on bf16 working copies, which it rewrites.

torch.optim.AdamW with two changes (`parallel.mixed_precision.WorkingCopies` says why):
- a master's gradient is its copy's `.grad` when the copy has one (else its own, e.g. accumulated
  over micro-batches), scaled by `step(grad_scale=...)` (gradient clipping without a pass of its own);
- after the update, each copy holds its master in the copy's dtype.
On a GPU with Triton each parameter takes one kernel (`adamw_triton`); elsewhere the reference path
widens the gradients onto the masters, runs torch's AdamW and copies back. The state (step,
exp_avg, exp_avg_sq per parameter) is torch's, so checkpoints load into either optimizer.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from parallel.mixed_precision import WorkingCopies
from pretrain.model.ops.library import has_triton
from pretrain.optim.adamw_triton import adamw_with_copy_, kernel_applies
from pretrain.optim.state import keep_implementation_on_load


class AdamWWithCopies(torch.optim.AdamW):
    def __init__(self, params: Iterable[Any], copies: WorkingCopies, **adamw: Any):
        for option in ("amsgrad", "maximize", "capturable", "differentiable", "fused"):
            if adamw.get(option):
                raise ValueError(f"AdamWWithCopies: option {option} is not supported; use torch.optim.AdamW")
        super().__init__(params, **adamw)
        self.copies = copies
        self._warned = False
        keep_implementation_on_load(self)  # not fused (nor CUDA step counts) from a fused AdamW's checkpoint

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None, grad_scale: float = 1.0) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p, self.copies.grad(p)) for group in self.param_groups for p in group["params"]]
        work = [(group, p, g) for group, p, g in work if g is not None]
        fast = [(group, p, g) for group, p, g in work if self._suits_kernel(p, g)]
        if len(fast) == len(work):
            for group, p, g in fast:
                self._fused_update(group, p, g, grad_scale)
            return loss
        if work and work[0][1].is_cuda and has_triton() and not self._warned:
            self._warned = True
            warnings.warn(f"AdamWWithCopies: {len(work) - len(fast)} of {len(work)} parameters do not suit the "
                          "fused kernel (layout or dtype); every parameter takes the reference path, torch's "
                          "AdamW on widened gradients", stacklevel=2)
        self._reference_step(work, grad_scale)
        return loss

    def _suits_kernel(self, p: Tensor, grad: Tensor) -> bool:
        copy, state = self.copies.of(p), self.state.get(p, {})  # .get: no empty state entries
        moments = [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
        return copy is not None and kernel_applies(p, grad, copy, *moments)

    def _fused_update(self, group: dict[str, Any], p: Tensor, grad: Tensor, grad_scale: float) -> None:
        state = self.state[p]
        if not state:  # as torch's AdamW initialises it (step on the CPU, moments like the parameter)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        adamw_with_copy_(p, grad, state["exp_avg"], state["exp_avg_sq"], self.copies.of(p),
                         step=int(state["step"].item()), lr=float(group["lr"]), beta1=beta1, beta2=beta2,
                         eps=group["eps"], weight_decay=group["weight_decay"], grad_scale=grad_scale)

    def _reference_step(self, work: list[tuple[dict[str, Any], Tensor, Tensor]], grad_scale: float) -> None:
        """torch's AdamW on the widened gradients, then copies <- masters."""
        for _, p, g in work:
            p.grad = g.to(p.dtype)  # a master's own gradient stays itself
            if grad_scale != 1.0:
                p.grad.mul_(grad_scale)
        super().step()
        self.copies.sync()

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.copies.zero_grad()
