"""The dry run of a large launch's parallel layout, without its GPUs.

`layout_report` builds the real device mesh on torch's fake process group (collectives return at
once, no peers exist) and applies the real TP / CP / FSDP wrapping (`parallelize_hybrid`) to the
model on the meta device, one representative rank at a time (under pipeline parallelism: the
model of that rank's stages only). Memory is read from the local shard shapes that rank would
hold; activations are an estimate; collectives per step are derived from the same shapes and the
layout's group sizes; the pipeline's bubble is the chosen schedule's textbook figure.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.placement_types import _StridedShard

from parallel.mesh import MESH_DIMS, ParallelDims, ParallelMesh, build_mesh
from parallel.pipeline import action_table_idle, bubble_fraction, local_stage_ids
from pretrain.config import JobConfig
from pretrain.job import build_model_from_config, parallel_dims, pipeline_plan, wrap_options
from pretrain.model.attention import Attention
from pretrain.model.mamba2 import Mamba2
from pretrain.model.ops.cross_entropy import CHUNK_LOGITS, KERNEL_CHUNK_BYTES
from pretrain.model.moe import MoE

GIB = 2**30
ACT_BYTES = 2  # bf16 activations and gathered parameters (training on GPUs)


def activation_bytes_per_token_per_dim(blocks: str, checkpointing: bool) -> int:
    """Bytes of activations kept per token per d_model for the stack of `blocks` (their symbols) under
    bf16 autocast, fitted to H200 peaks of the 1B presets on one GPU at 4K-32K tokens per micro-batch
    (docs/benchmarks.md, "Activation memory"): per block, 67 for attention (A/S, llama) and 104 for
    a block with a Mamba2 mixer (M/H, hybrid_moe); with activation checkpointing, the fp32 block
    inputs (4 per block) plus one block being recomputed (~20)."""
    if checkpointing:
        return 4 * len(blocks) + 20
    return sum(67 if sym in "AS" else 104 for sym in blocks)


def loss_working_set_bytes(vocab: int, d_model: int, rows: int) -> int:
    """The chunked cross-entropy's memory on the rank holding the head (`vocab` rows of it) for
    `rows` positions: the fp32 head-weight gradient it computes in the forward and the scaled copy
    its backward returns, and one chunk's temporaries: on the PyTorch path (TP, CPU) fp32 logits and
    their gradient plus their bf16 casts, ~2.5 x 4 bytes per logit of a chunk of at most
    `CHUNK_LOGITS`; on the Triton path the chunk's 16-bit logits alone, at most `KERNEL_CHUNK_BYTES`.
    The larger of the two."""
    logits = rows * vocab
    return 2 * vocab * d_model * 4 + max(10 * min(logits, CHUNK_LOGITS), min(2 * logits, KERNEL_CHUNK_BYTES))


def loss_rows(cfg: JobConfig, dims: ParallelDims) -> int:
    """Positions one rank's loss covers per micro-batch (its sequence shard under CP)."""
    return cfg.train.micro_batch_size * cfg.data.seq_len // dims.cp


def activation_bytes(blocks: str, cfg: JobConfig, d_model: int, dims: ParallelDims, in_flight: float = 1.0) -> float:
    """Activations one rank keeps for `in_flight` micro-batches through `blocks`: the 1-GPU
    calibration (`activation_bytes_per_token_per_dim`) split over tp x cp. One formula for the dry
    run's whole-model estimate and `rank_memory`'s per-rank one."""
    per = activation_bytes_per_token_per_dim(blocks, cfg.train.activation_checkpointing)
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    return in_flight * per * tokens * d_model / (dims.tp * dims.cp)


@dataclass
class RankMemory:
    params: int  # elements this rank holds (fp32 master weights)
    expected: float  # the same, counted as total / shards of each parameter
    largest_block: int  # elements of the largest block this rank gathers (FSDP) for compute (pipelined: all)
    activations: float  # bytes per micro-batch, or at a pipeline rank's peak (estimate)
    loss: float = 0.0  # bytes of the chunked cross-entropy's working set (ranks holding the head)
    in_flight: float = 1.0  # micro-batches' worth of activations held (pipeline: microbatches in flight / m)
    pipelined: bool = False

    def lines(self) -> list[str]:
        p = self.params * 4
        gathered = ("largest block unsharded for compute (bf16)" if not self.pipelined else
                    "all this rank's blocks unsharded for the step (bf16, pipelined: no reshard between microbatches)")
        return [f"  parameters   {self.params:,} elements: fp32 weights {p / GIB:.2f} GiB + gradients {p / GIB:.2f} GiB"
                f" + AdamW moments {2 * p / GIB:.2f} GiB = {4 * p / GIB:.2f} GiB"
                f" (total / shards per tensor: {self.expected:,.0f}, {100 * (self.params / self.expected - 1):+.2f}%)",
                f"  gathered     {gathered}: {self.largest_block * ACT_BYTES / GIB:.2f} GiB"
                + ("" if self.pipelined else " (x2 with prefetch)"),
                f"  activations  ~{self.activations / GIB:.2f} GiB " + (
                    "per micro-batch" if self.in_flight == 1 else
                    f"at the pipeline peak ({self.in_flight:g} micro-batch of this rank's blocks in flight)")
                + " (estimate: 1-GPU calibration / (tp x cp))"] + (
                [f"  loss         ~{self.loss / GIB:.2f} GiB: the chunked cross-entropy's fp32 head gradient and "
                 "logits chunk (this rank's vocabulary)"] if self.loss else [])


@contextlib.contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[None]:
    """This process as rank `rank` of `world_size` on torch's fake backend."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _local_numel(module: nn.Module) -> int:
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in module.parameters())


def _shards(p: torch.Tensor, only: str | None = None) -> int:
    """How many ranks split this parameter: the product of the mesh sizes it is sharded over
    (only the mesh dimension named `only`, when given)."""
    if not isinstance(p, DTensor):
        return 1
    n = 1
    for name, size, placement in zip(p.device_mesh.mesh_dim_names, p.device_mesh.shape, p.placements):
        split = placement.is_shard() or isinstance(placement, _StridedShard)  # FSDP over TP: strided
        n *= size if split and only in (None, name) else 1
    return n


def _gathered_numel(module: nn.Module) -> int:
    """Elements of `module` once FSDP has gathered them (still split by tensor and expert parallelism)."""
    return sum(p.numel() // (_shards(p, "tp") * _shards(p, "ep")) for p in module.parameters())


def rank_memory(model: nn.Module, cfg: JobConfig, dims: ParallelDims, in_flight: float = 1.0) -> RankMemory:
    """`in_flight`: micro-batches' worth of activations a pipeline rank holds at its peak
    (pipeline microbatches in flight x their size; 1 without pipelining)."""
    params = _local_numel(model)
    expected = sum(p.numel() / _shards(p) for p in model.parameters())
    gathered = [_gathered_numel(b) for b in model.blocks.values()]
    largest = sum(gathered) if dims.pp > 1 else max(gathered)  # pipelined blocks stay gathered for the step
    mcfg = model.config
    blocks = "".join(mcfg.blocks[int(i)] for i in model.blocks)
    activations = activation_bytes(blocks, cfg, mcfg.d_model, dims, in_flight)
    loss = loss_working_set_bytes(mcfg.vocab_size // dims.tp, mcfg.d_model, loss_rows(cfg, dims)) \
        if model.head is not None else 0
    return RankMemory(params, expected, largest, activations, loss, in_flight if dims.pp > 1 else 1.0, dims.pp > 1)


def collectives(model: nn.Module, cfg: JobConfig, dims: ParallelDims, grad_accum: int,
                pipeline: tuple[tuple[tuple[int, int], ...], list[int]] | None = None) -> list[tuple[str, int, int, int]]:
    """(kind, group size, count per step, bytes each on average) of one optimizer step on one rank,
    read off the wrapped model's modules: FSDP per block and root, TP's sequence gathers and
    scatters per mixer and FFN (again in recompute under activation checkpointing), gradient sums
    of replicated weights that serve rank-local work, CP's K/V gathers and Mamba2 exchanges, and
    under expert parallelism the experts' own FSDP group and the all-to-all of the routed rows
    (bytes sent to other ranks, assuming balanced routing; the per-expert counts exchanged first
    are a few bytes), and the pipeline's point-to-point sends (`pipeline`: every stage's blocks
    and this rank's stage ids)."""
    mb, seq = cfg.train.micro_batch_size, cfg.data.seq_len
    tp, cp, fsdp = dims.tp, dims.cp, dims.dp_shard * dims.cp
    fwd = 2 if cfg.train.activation_checkpointing else 1  # forward collectives run again in recompute
    ep_fwd = 1 if cfg.train.ac_mode == "selective" else fwd  # selective keeps the all-to-alls' outputs
    rows: dict[tuple[str, int], list[float]] = {}  # (kind, group) -> [count, total bytes]

    def add(kind: str, group: int, count: int, nbytes: float) -> None:
        if group > 1 and count > 0:
            row = rows.setdefault((kind, group), [0, 0.0])
            row[0] += count
            row[1] += count * nbytes

    blocks = list(model.blocks.values())
    root = _gathered_numel(model) - sum(_gathered_numel(b) for b in blocks)
    efsdp = fsdp // dims.ep
    regather = 1 if pipeline is None else 0  # pipelined blocks stay gathered for the whole step
    for i, b in enumerate(blocks):  # the last block stays gathered for backward
        experts = sum(_gathered_numel(m.experts) for m in b.modules() if isinstance(m, MoE)) if dims.ep > 1 else 0
        dense = _gathered_numel(b) - experts
        add("FSDP all-gather params (bf16)", fsdp, 1 + regather * (i < len(blocks) - 1), dense * ACT_BYTES)
        add("FSDP reduce-scatter grads (fp32)", fsdp, 1, dense * 4)
        if experts:
            add("EP experts: FSDP all-gather params over efsdp (bf16)", efsdp, 1 + regather, experts * ACT_BYTES)
            add("EP experts: FSDP reduce-scatter grads over efsdp (fp32)", efsdp, 1, experts * 4)
    add("FSDP all-gather params (bf16)", fsdp, 1 + regather, root * ACT_BYTES)
    add("FSDP reduce-scatter grads (fp32)", fsdp, 1, root * 4)
    add("HSDP all-reduce grads (fp32)", dims.dp_replicate, 1, _local_numel(model) * 4)
    stream = mb * seq // cp * model.config.d_model * ACT_BYTES  # a sequence-parallel activation, gathered
    for kind in ("TP all-gather activations (SP)", "TP reduce-scatter activations (SP)"):
        add(kind, tp, (fwd + 1) * 2 * len(blocks) + 2, stream)  # mixer + FFN per block; embedding, loss
    replicated = 0
    for m in model.modules():
        if isinstance(m, Mamba2) and m.bc_tp_group is not None:
            replicated += sum(p.numel() for part in (m.B_proj, m.C_proj, m.conv_B, m.conv_C) for p in part.parameters())
        if isinstance(m, MoE) and m.tp_group is not None:
            replicated += m.router.weight.numel() + _gathered_numel(m.experts)
        if isinstance(m, MoE) and m.ep_group is not None:
            # rows leaving a rank for the other ep ranks (balanced routing: (ep-1)/ep of them),
            # there and back, forward (again in a full recompute) and backward
            sent = mb * seq // (cp * tp) * m.cfg.top_k * (dims.ep - 1) / dims.ep
            add("EP all-to-all expert rows (dispatch, combine)", dims.ep, 2 * (ep_fwd + 1),
                sent * model.config.d_model * ACT_BYTES)
        if isinstance(m, Attention) and m.cp_group is not None:
            kv = mb * seq * m.n_kv_heads // tp * (m.qk_head_dim + m.v_head_dim) * ACT_BYTES / 2
            add("CP all-gather K, V", cp, 2 * fwd, kv)
            add("CP reduce-scatter K, V grads", cp, 2, kv)
        if isinstance(m, Mamba2) and m.cp_group is not None:
            local = mb * seq // cp // tp * ACT_BYTES
            bc = mb * seq * 2 * m.n_groups * m.d_state // (tp if m.bc_tp_group is None else 1) * ACT_BYTES
            for nbytes in (local * m.d_ssm, local * m.n_heads, local * m.d_ssm):  # x and dt in, y out
                add("CP all-to-all Mamba2 x, dt, y", cp, fwd + 1, nbytes)
            add("CP all-gather Mamba2 B, C", cp, fwd, bc)
            add("CP reduce-scatter Mamba2 B, C grads", cp, 1, bc)
    add("TP all-reduce grads of replicated weights on local work", tp, 1, replicated * ACT_BYTES)
    if pipeline is not None:  # each local stage boundary: activations forward, their gradients back
        stages, ids = pipeline
        boundaries = sum((s > 0) + (s < len(stages) - 1) for s in ids)
        m = cfg.parallel.pp_microbatches or dims.pp
        add("PP send/recv activations + grads (bf16)", 2, 2 * boundaries * m, mb * seq // (m * cp * tp)
            * model.config.d_model * ACT_BYTES)
    return [(kind, group, int(count) * grad_accum, int(total / count)) for (kind, group), (count, total) in rows.items()]


def coordinate(mesh: ParallelMesh) -> str:
    ep = f", ep {mesh.ep.get_local_rank()}" if mesh.ep is not None else ""
    return ", ".join(f"{d} {mesh.world[d].get_local_rank()}" for d in MESH_DIMS) + ep


def pipeline_lines(cfg: JobConfig, dims: ParallelDims, stages: tuple[tuple[int, int], ...], per_rank: int,
                   mesh: ParallelMesh) -> list[str]:
    """Every stage's blocks, parameters and FLOPs share, and the schedule's bubble: the textbook
    figure and what torch's action order for the schedule leaves idle on each pp rank."""
    from pretrain.accounting import block_flops_per_token, block_params

    mcfg = build_model_from_config(cfg, device="meta").config
    per_block, flops = block_params(mcfg).per_block, block_flops_per_token(mcfg, cfg.data.seq_len)
    head = 6 * mcfg.d_model * mcfg.vocab_size
    total = sum(flops) + head
    m = cfg.parallel.pp_microbatches or dims.pp
    bubble = bubble_fraction(cfg.parallel.pp_schedule, dims.pp, m, per_rank)
    lines = [f"pipeline             {cfg.parallel.pp_schedule}: {len(stages)} stages ({per_rank} per pp rank), {m} "
             f"microbatches per micro-batch; bubble {100 * bubble:.1f}% of step time (textbook figure"
             f"{'' if cfg.parallel.pp_schedule in ('1f1b', 'interleaved_1f1b') else ' of interleaved 1F1B'}, equal stage times)"]
    idle = action_table_idle(cfg.parallel.pp_schedule, dims.pp, m, per_rank, mesh.pp_mesh().get_group())
    if idle is not None:
        lines.append("  idle in torch's action order (one slot per action) by pp rank: "
                     + ", ".join(f"{100 * f:.1f}%" for f in idle))
    for i, (a, b) in enumerate(stages):
        params = sum(per_block[sym] for sym in mcfg.blocks[a:b])
        extra = mcfg.vocab_size * mcfg.d_model * ((i == 0) + (i == len(stages) - 1))  # embedding, head
        share = (sum(flops[a:b]) + head * (i == len(stages) - 1)) / total
        lines.append(f"  stage {i:<3d} blocks {a}-{b - 1} {''.join(mcfg.blocks[a:b]):16s} {params + extra:>14,} params"
                     f"{' (+embedding)' if i == 0 else ''}{' (+head)' if i == len(stages) - 1 else ''}"
                     f"  {100 * share:5.1f}% of FLOPs")
    return lines


def layout_report(cfg: JobConfig, world_size: int, ranks: list[int], grad_accum: int) -> str:
    """What every representative rank of a `world_size`-rank launch of `cfg` holds and sends."""
    from pretrain.model.parallelize import parallelize_hybrid, pipeline_model

    dims = parallel_dims(cfg, world_size)
    wrap = wrap_options(cfg, torch.bfloat16)  # the run's options, as the trainer applies them on the GPU
    experts = f" (experts: ep {dims.ep} x efsdp {dims.dp_shard * dims.cp // dims.ep} of dp_shard x cp)"
    lines = [f"layout               {world_size} ranks = " + " x ".join(f"{d} {s}" for d, s in zip(MESH_DIMS, dims.sizes()))
             + (experts if dims.ep > 1 else "")]
    plan = None
    if dims.pp > 1:
        plan = pipeline_plan(cfg, build_model_from_config(cfg, device="meta").config)
        with fake_process_group(ranks[0], world_size):
            lines += pipeline_lines(cfg, dims, *plan, build_mesh(dims, "cpu"))
    for rank in ranks:
        with fake_process_group(rank, world_size):
            mesh = build_mesh(dims, "cpu")
            model = build_model_from_config(cfg, device="meta")
            in_flight, pipeline = 1.0, None
            if plan is not None:
                stages, per_rank = plan
                pp_rank = mesh.world["pp"].get_local_rank()
                ids = local_stage_ids(cfg.parallel.pp_schedule, pp_rank, dims.pp, per_rank)
                model, _ = parallelize_hybrid(pipeline_model(model.config, stages, ids), mesh, stages=stages,
                                              stage_ids=ids, **wrap)
                m = cfg.parallel.pp_microbatches or dims.pp
                # 1F1B-like warm-up: stage s holds min(m, pp - s) pipeline microbatches (each 1/m of one)
                in_flight = min(m, (dims.pp - pp_rank) * per_rank) / m
                pipeline = stages, ids
                lines.append(f"rank {rank} ({coordinate(mesh)}): stages {ids}, blocks "
                             f"{', '.join(f'{stages[i][0]}-{stages[i][1] - 1}' for i in ids)}")
            else:
                parallelize_hybrid(model, mesh, **wrap)
                lines.append(f"rank {rank} ({coordinate(mesh)})")
            lines += rank_memory(model, cfg, dims, in_flight).lines()
            if rank == ranks[0]:
                rows = collectives(model, cfg, dims, grad_accum, pipeline)
    who = "every rank" if plan is None else f"rank {ranks[0]} (pipeline ranks differ)"
    lines.append(f"collectives per optimizer step on {who} ({grad_accum} micro-batch(es)):")
    lines.append(f"  {'kind':56s} {'group':>5s} {'count':>6s} {'MiB each':>9s} {'GiB total':>10s}")
    for kind, group, count, nbytes in rows:
        lines.append(f"  {kind:56s} {group:5d} {count:6d} {nbytes / 2**20:9.1f} {count * nbytes / GIB:10.2f}")
    return "\n".join(lines)
