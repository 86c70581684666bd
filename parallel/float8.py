"""FP8 training of linear layers through torchao's float8 (`torch._scaled_mm`, Hopper or newer).

Only large, well-shaped GEMMs gain: a small or odd-shaped one (a dimension below 512 or not a
multiple of 16) costs more in casts and scales than it saves, and stays bf16, as do the layers the
caller names (LM head, MoE router: precision-sensitive, or never called through their module).
Tensorwise scaling lets FSDP2 all-gather the weights already in float8 (half the bytes).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn

FP8_RECIPES = ("none", "tensorwise", "rowwise")
MIN_DIM = 512


def float8_unavailable(recipe: str, device: torch.device | None) -> str | None:
    """Why `train.fp8 = recipe` cannot run here (one line naming the field and the fix), or None.
    `device` None (a dry run, which models a GPU run) checks only that torchao is installed."""
    if recipe not in FP8_RECIPES:
        return f"train.fp8 = {recipe!r} must be one of {', '.join(FP8_RECIPES)}"
    if recipe == "none":
        return None
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "train.fp8 needs torchao (pip install torchao, the [gpu] extra); or set train.fp8=none"
    if device is not None and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9)):
        return f"train.fp8 = {recipe!r} needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper); set train.fp8=none"
    return None


def float8_eligible(module: nn.Module, fqn: str, skip: Callable[[str], bool]) -> bool:
    """A plain nn.Linear whose both dims are >= MIN_DIM and multiples of 16, not named by `skip`."""
    if type(module) is not nn.Linear or skip(fqn):
        return False
    out_features, in_features = module.weight.shape
    return min(in_features, out_features) >= MIN_DIM and in_features % 16 == 0 and out_features % 16 == 0


def apply_float8(model: nn.Module, recipe: str, skip: Callable[[str], bool] = lambda fqn: False,
                 fsdp: bool = False) -> list[str]:
    """Swap the eligible linears of `model` for torchao's Float8Linear in place (before compile
    and FSDP); returns their names. `recipe` is "tensorwise" or "rowwise"; `fsdp`: FSDP2 will
    shard the model (tensorwise weights are then all-gathered in float8)."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    converted = [fqn for fqn, m in model.named_modules() if float8_eligible(m, fqn, skip)]
    convert_to_float8_training(model, config=config, module_filter_fn=lambda m, fqn: float8_eligible(m, fqn, skip))
    return converted


def precompute_float8_scales(model: nn.Module, recipe: str) -> None:
    """After each optimizer step under FSDP2 with tensorwise float8 all-gather: one amax
    all-reduce for all weights instead of one per weight."""
    if recipe == "tensorwise":
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        precompute_float8_dynamic_scale_for_fsdp(model)
