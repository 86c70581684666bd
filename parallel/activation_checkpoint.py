"""Activation checkpointing per block: keep only block inputs, recompute the rest in backward.

Trades about one extra forward for activation memory that no longer grows with depth. The
wrapper's `_checkpoint_wrapped_module.` prefix is removed from state-dict keys by
torch.distributed.checkpoint.state_dict, so checkpoints load with it on or off.

"selective" keeps the outputs of the expensive ops (matmuls, attention, the SSD scan, grouped
GEMMs, expert parallelism's all-to-all) and recomputes only the cheap ones (norms, activations,
casts, elementwise): most of full checkpointing's memory saving for a fraction of its recompute,
and no communication repeated.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

AC_MODES = ("full", "selective")
# Why train.ac_mode=selective is refused with train.compile (the config check and parallelize_hybrid say it).
SELECTIVE_IS_EAGER = ("runs eagerly only (its policy cannot see inside a compiled block); use train.ac_mode=full "
                      "with train.compile, or turn compile off")


def _expensive_ops() -> set:
    """Ops whose outputs selective checkpointing saves (the custom ones where registered)."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_mm", "_grouped_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_flash_attention_forward", "_efficient_attention_forward"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    ops.add(torch.ops._c10d_functional.all_to_all_single.default)  # parallel/expert_parallel.py's exchanges
    for qualified in ("pretrain.ssd_scan", "pretrain.grouped_mm", "pretrain.causal_conv1d"):
        namespace, name = qualified.split(".")
        if hasattr(getattr(torch.ops, namespace), name):
            ops.add(getattr(getattr(torch.ops, namespace), name).default)
    return ops


def _ignore_profiler_ranges() -> None:
    """Leave profiler ranges out of selective checkpointing's op-by-op replay, like `detach`.
    FSDP2 marks its hooks with ranges, and a unit inside a block (the routed experts under expert
    parallelism, sharded on their own mesh) opens one more in the recompute than in the forward
    ("FSDP::root_pre_forward"): the replay would refuse the block as nondeterministic. The ranges
    carry no tensors. (torch without SAC_IGNORED_OPS does not replay by index.)"""
    ignored = getattr(torch.utils.checkpoint, "SAC_IGNORED_OPS", None)
    if ignored is not None:
        profiler = torch.ops.profiler
        ignored.update({profiler._record_function_enter_new.default, profiler._record_function_exit._RecordFunction})


def _contexts(save: frozenset | None):
    """checkpoint's context_fn: (forward context, recompute context); selective when `save` (the
    ops whose outputs are kept) is given."""
    if save is None:
        return contextlib.nullcontext(), contextlib.nullcontext()
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(blocks: nn.Module, mode: str = "full") -> None:
    """Wrap every block of the container (ModuleList or ModuleDict) in place (after compile: see pretrain/model/parallelize.py); call before
    FSDP so each sharded unit is a wrapped block. `mode`: "full" or "selective"."""
    if mode not in AC_MODES:
        raise ValueError(f"train.ac_mode = {mode!r} must be one of {', '.join(AC_MODES)}")
    if mode == "selective" and not hasattr(torch.utils.checkpoint, "create_selective_checkpoint_contexts"):
        raise ValueError("train.ac_mode=selective needs torch.utils.checkpoint.create_selective_checkpoint_contexts "
                         "(torch >= 2.4); use train.ac_mode=full")
    if mode == "selective":
        _ignore_profiler_ranges()
    context_fn = functools.partial(_contexts, frozenset(_expensive_ops()) if mode == "selective" else None)
    for name, block in list(blocks.named_children()):
        blocks.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn))
