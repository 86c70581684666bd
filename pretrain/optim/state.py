"""Loading an optimizer's state without taking the saver's implementation."""
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
