"""The one function that applies every parallelism to a HybridLM, in TorchTitan's order:
tensor/sequence parallel -> activation checkpointing -> compile -> FSDP2.

It sits beside the model because it knows the block symbols; the mechanisms live in `parallel/`.
"""
from __future__ import annotations

import torch

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.compile import compile_blocks
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelMesh
from pretrain.model.lm import HybridLM


def parallelize_hybrid(model: HybridLM, mesh: ParallelMesh | None, *, param_dtype: torch.dtype = torch.float32,
                       activation_checkpointing: bool = False, compile: bool = False) -> HybridLM:
    """Wrap `model` in place (built on meta or materialised) and return it. `mesh` None: one process."""
    if activation_checkpointing:
        apply_activation_checkpointing(model.blocks)
    if compile:
        compile_blocks(model.blocks)
    if mesh is not None:
        apply_fsdp(model, model.blocks, mesh.fsdp_mesh(), param_dtype=param_dtype, reduce_dtype=torch.float32,
                   forward_methods=("loss",))
    return model
