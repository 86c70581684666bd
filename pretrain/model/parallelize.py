"""The one function that applies every parallelism to a HybridLM, in TorchTitan's order:
expert parallel -> tensor/sequence parallel -> context parallel -> float8 -> compile ->
activation checkpointing -> FSDP2.

Compile goes inside the checkpoint wrapper: dynamo cannot break a graph, nor replay the MoE's
load counting, inside a checkpointed region, and falls back to running the WHOLE block eagerly
(with the wrapper outside, the trainer's compile option gained ~1%).

It sits beside the model because it knows the model's parts; the mechanisms live in `parallel/`.
Each mixer and FFN declares its own TP placements (`shard_for_tp`, next to its code), whatever its
block symbol (A/S attention, M Mamba2, H intra-hybrid; SwiGLU or MoE).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import RowwiseParallel, SequenceParallel, parallelize_module

from parallel.activation_checkpoint import SELECTIVE_IS_EAGER, apply_activation_checkpointing
from parallel.compile import compile_blocks
from parallel.expert_parallel import shard_experts
from parallel.float8 import apply_float8
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelMesh
from parallel.tensor_parallel import sequence_parallel_region, shard_parameters
from pretrain.model.attention import Attention
from pretrain.model.config import ModelConfig
from pretrain.model.lm import HybridLM
from pretrain.model.mamba2 import Mamba2
from pretrain.model.moe import MoE


def parallelize_hybrid(model: HybridLM, mesh: ParallelMesh | None, *, param_dtype: torch.dtype = torch.float32,
                       reduce_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
                       compile: bool = False, compile_backend: str = "inductor", fp8: str = "none",
                       ac_mode: str = "full",
                       stages: Sequence[tuple[int, int]] | None = None,
                       stage_ids: Sequence[int] = ()) -> HybridLM | tuple[HybridLM, list[HybridLM]]:
    """Wrap `model` in place (built on meta or materialised) and return it. `mesh` None: one process.
    `param_dtype` is what FSDP computes in, `reduce_dtype` what it reduces gradients in; `fp8`
    ("none" | "tensorwise" | "rowwise") converts the large linears to torchao float8; `ac_mode`
    ("full" | "selective") is the activation checkpointing kind when it is on.

    Under pipeline parallelism `model` holds this rank's pipeline stages (`pipeline_model`):
    `stages` are every stage's [start, end) blocks and `stage_ids` this rank's; returns the model
    and one stage module per id, made of the model's (wrapped) modules."""
    n_stages = len(stages) if stages is not None else 1
    ep_mesh = mesh.ep if mesh is not None else None
    if ep_mesh is not None:
        apply_expert_parallel(model, ep_mesh)
    tp_mesh = mesh.tp_mesh() if mesh is not None else None
    if tp_mesh is not None:
        if fp8 != "none":
            raise ValueError(f"train.fp8={fp8} is not supported with parallel.tp={tp_mesh.size()} > 1; set train.fp8=none")
        apply_tensor_parallel(model, tp_mesh)
    cp_mesh = mesh.cp_mesh() if mesh is not None else None
    if cp_mesh is not None:
        apply_context_parallel(model, cp_mesh, tp_mesh.size() if tp_mesh is not None else 1)
    if fp8 != "none":
        apply_float8(model, fp8, float8_skip(model).__contains__, fsdp=mesh is not None)
    if compile:
        compile_blocks(model.blocks, compile_backend)
    if activation_checkpointing:
        if compile and ac_mode == "selective":
            raise ValueError(f"train.ac_mode=selective {SELECTIVE_IS_EAGER}")
        apply_activation_checkpointing(model.blocks, ac_mode)
    if mesh is not None and stages is None:
        experts = [(m.experts, mesh.efsdp) for m in model.moe_layers()] if ep_mesh is not None else []
        apply_fsdp(model, model.blocks.values(), mesh.fsdp_mesh(), param_dtype=param_dtype, reduce_dtype=reduce_dtype,
                   own_mesh=experts)
    if stages is None:
        return model
    views = [model.stage(range(*stages[i]), i == 0, i == n_stages - 1) for i in stage_ids]
    if mesh is not None:
        # Every part is its own FSDP unit (the embedding and head too), so each stage is a root
        # without parameters of its own; blocks stay gathered between the microbatches of a step.
        mp = dict(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for unit in (model.embed, model.norm):
            if unit is not None:
                apply_fsdp(unit, (), mesh.fsdp_mesh(), reshard_after_forward=False, **mp)
        if model.head is not None:  # never tied under pipeline parallelism
            apply_fsdp(model.head, (), mesh.fsdp_mesh(), reshard_after_forward=False, forward_methods=("loss",), **mp)
        for block in model.blocks.values():
            experts = [(m.experts, mesh.efsdp) for m in block.modules() if isinstance(m, MoE)] if ep_mesh is not None else []
            apply_fsdp(block, (), mesh.fsdp_mesh(), reshard_after_forward=False, own_mesh=experts, **mp)
        for view in views:
            apply_fsdp(view, (), mesh.fsdp_mesh(), reshard_after_forward=False, **mp)
    return model, views


def apply_expert_parallel(model: HybridLM, ep_mesh: DeviceMesh) -> None:
    """Every MoE's routed experts sharded over the ep ranks, its tokens exchanged with them by
    all-to-all; router and shared experts stay dense (data-parallel, TP-sharded under TP)."""
    layers = list(model.moe_layers())
    if not layers:
        raise ValueError(f"parallel.ep={ep_mesh.size()} needs an MoE model (arch ending in _moe, or hybrid_moe); "
                         "set parallel.ep=1")
    for moe in layers:
        shard_experts(moe.experts, ep_mesh)
        moe.ep_group = moe.experts.ep_group = ep_mesh.get_group()


def float8_skip(model: HybridLM) -> set[str]:
    """Linears float8 must leave alone: the LM head and MoE routers (precision-sensitive; both are
    applied through their weights, not their modules) and Mamba2's input projections (run as one
    fused GEMM over their concatenated weights, never through their modules)."""
    skip = {"head"}
    for name, module in model.named_modules():
        if isinstance(module, Mamba2):
            skip |= {f"{name}.{part}_proj" for part in Mamba2.PARTS}
        elif isinstance(module, MoE):
            skip.add(f"{name}.router")
    return skip


def apply_tensor_parallel(model: HybridLM, tp_mesh: DeviceMesh) -> None:
    """Tensor + sequence parallelism: between blocks the residual stream, the norms and the
    embedding output are sharded on the sequence; every mixer and FFN all-gathers its input,
    computes on its heads / hidden units, and reduce-scatters its output. The embedding and the
    (tied or separate) head are vocabulary-parallel, and so is the loss."""
    tp, group = tp_mesh.size(), tp_mesh.get_group()
    if model.config.vocab_size % tp:
        raise ValueError(f"parallel.tp={tp} must divide the vocabulary size {model.config.vocab_size} "
                         "(vocabulary-parallel embedding and loss); pad the vocabulary or change tp")
    if model.embed is not None:
        parallelize_module(model.embed, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                                                     use_local_output=False))
    if model.head is not None:
        if not model.head.tied:  # the tied head reads the embedding's vocabulary shard
            shard_parameters(model.head, tp_mesh, {"weight": Shard(0)})
        model.head.tp_mesh = tp_mesh
        parallelize_module(model.norm, tp_mesh, SequenceParallel())
    for block in model.blocks.values():
        parallelize_module(block, tp_mesh, {"mixer_norm": SequenceParallel(), "ffn_norm": SequenceParallel()})
        for part in (block.mixer, block.ffn):
            shard_parameters(part, tp_mesh, part.shard_for_tp(tp, group))
            sequence_parallel_region(part, tp_mesh)
    model.tp_mesh = tp_mesh


def apply_context_parallel(model: HybridLM, cp_mesh: DeviceMesh, tp: int) -> None:
    """Every attention (also the intra-hybrid's branch) gathers keys/values over the CP ranks;
    every Mamba2 scan runs head-sharded over them. Token-wise layers need nothing."""
    group = cp_mesh.get_group()
    for module in model.modules():
        if isinstance(module, Attention):
            module.cp_group = group
        elif isinstance(module, Mamba2):
            module.enable_cp(group, tp)
        elif isinstance(module, MoE) and module.cfg.aux_loss_coef > 0:
            raise ValueError(f"parallel.cp={cp_mesh.size()} needs model.overrides.moe.aux_loss_coef=0 (each CP rank "
                             "would compute the balance loss over its share of the sequence, not the whole); use "
                             "the aux-loss-free bias balancing")


def pipeline_model(cfg: ModelConfig, stages: Sequence[tuple[int, int]], stage_ids: Sequence[int]) -> HybridLM:
    """This rank's pipeline stages as one model on the meta device: their blocks (global ids),
    the embedding when it holds the first stage, the final norm and head when it holds the last."""
    layers = [i for s in stage_ids for i in range(*stages[s])]
    with torch.device("meta"):
        return HybridLM(cfg, layers, first=0 in stage_ids, last=len(stages) - 1 in stage_ids)
