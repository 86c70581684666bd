"""An optimizer's state for checkpoints: created at step 0 up front, and loaded without taking the
saver's implementation."""
from __future__ import annotations

from typing import Any

import torch

IMPLEMENTATION_OPTIONS = ("foreach", "fused", "capturable", "differentiable")


def keep_implementation_on_load(optimizer: torch.optim.Optimizer) -> None:
    """`Optimizer.load_state_dict` takes the saved param groups' options, how the update runs
    included: a checkpoint of torch's fused AdamW (a CUDA run, or FSDP) would make an optimizer
    loading it fused, with its step counts moved to the GPU, and one saved by a foreach optimizer
    would turn a fused one foreach. After this, loading keeps the options `optimizer` was built with."""

    def keep_own(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        if len(state_dict["param_groups"]) != len(opt.param_groups):
            return None  # unchanged: load_state_dict's own check names the mismatch
        groups = [{**saved, **{k: own[k] for k in IMPLEMENTATION_OPTIONS if k in own}}
                  for saved, own in zip(state_dict["param_groups"], opt.param_groups)]
        return {**state_dict, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(keep_own)


def initialise_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its state at step 0 (zero moments), as its first step would. torch's
    `get_state_dict` fills an optimizer without state by taking a step at lr 0, and that step
    counts: a checkpoint saved before the first good step (every step so far non-finite, then a
    preemption) resumed with each later bias correction one step off. Here the same zero step
    creates the state in the implementation's own format, and its count is set back to 0. An
    optimizer that has state or gradients already is left alone (as by torch's own initialisation).
    The step is exact: weights x (1 - 0 x decay), plus 0 x 0 / eps (config refuses optim.eps = 0)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if optimizer.state or any(p.grad is not None for p in params):
        return
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients at lr 0: moments stay 0, weights (decay x lr = 0) unchanged
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"].zero_()
        elif "step" in state:
            state["step"] = 0
