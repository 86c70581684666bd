"""The device mesh: one named dimension per parallelism, sized 1 when unused.

Tensor, pipeline, context and expert parallelism plug in here by giving their dimension a size,
without the trainer's loop changing. `ep` borrows ranks from dp_shard x cp (as in TorchTitan), so
it is not part of the world-size product: those ranks are split into ep x efsdp, where the routed
experts are sharded over ep and FSDP-sharded over efsdp (the remaining data ranks).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    """Sizes of each parallel dimension. dp_shard = -1 takes whatever the others leave."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    ep: int = 1

    def resolve(self, world_size: int) -> "ParallelDims":
        """Fill dp_shard and check the product equals the world size."""
        others = self.pp * self.dp_replicate * self.cp * self.tp
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % others:
                raise ValueError(f"parallel: pp*dp_replicate*cp*tp={others} does not divide world size "
                                 f"{world_size}; change the parallel sizes")
            dp_shard = world_size // others
        if others * dp_shard != world_size:
            raise ValueError(f"parallel: pp*dp_replicate*dp_shard*cp*tp={others * dp_shard} != world size "
                             f"{world_size}; set parallel.dp_shard=-1 or fix the sizes")
        if self.ep < 1 or (dp_shard * self.cp) % self.ep:
            raise ValueError(f"parallel.ep={self.ep} must be >= 1 and divide dp_shard*cp={dp_shard * self.cp} "
                             "(expert ranks are borrowed from them); change parallel.ep")
        return ParallelDims(self.pp, self.dp_replicate, dp_shard, self.cp, self.tp, self.ep)

    @property
    def dp(self) -> int:
        """Number of distinct data-parallel coordinates (ranks that read different batches)."""
        return self.dp_replicate * self.dp_shard

    def sizes(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in MESH_DIMS)


@dataclass
class ParallelMesh:
    """The world mesh with every named dimension, the flattened data-parallel mesh
    (dp_replicate x dp_shard) that the loader uses, and dp x cp: the ranks that see different
    tokens (loss averaging, expert loads; FSDP shards over dp_shard x cp)."""

    world: DeviceMesh
    dp: DeviceMesh
    dp_cp: DeviceMesh
    dp_shard_cp: DeviceMesh
    ep: DeviceMesh | None = None  # expert-parallel ranks (a slice of dp_shard x cp), None when ep = 1
    efsdp: DeviceMesh | None = None  # what the routed experts are FSDP-sharded over under ep > 1

    def dp_coordinate(self) -> tuple[int, int]:
        """(dp_rank, dp_size) for the data loader: tp/pp/cp peers share a coordinate."""
        return self.dp.get_local_rank(), self.dp.size()

    def dp_group(self) -> dist.ProcessGroup:
        """The process group of this rank's data-parallel peers (what per-batch statistics,
        such as MoE expert loads, are summed over; tp/pp/cp peers saw the same batch)."""
        return self.dp.get_group()

    def tokens_group(self) -> dist.ProcessGroup:
        """The ranks that see different tokens (dp x cp): a per-token mean or count sums over them."""
        return self.dp_cp.get_group()

    def tp_mesh(self) -> DeviceMesh | None:
        """The tensor-parallel mesh, or None when tp = 1."""
        return self.world["tp"] if self.world["tp"].size() > 1 else None

    def pp_mesh(self) -> DeviceMesh | None:
        """The pipeline-parallel mesh (the ranks holding the other stages), or None when pp = 1."""
        return self.world["pp"] if self.world["pp"].size() > 1 else None

    def cp_mesh(self) -> DeviceMesh | None:
        """The context-parallel mesh, or None when cp = 1."""
        return self.world["cp"] if self.world["cp"].size() > 1 else None

    def fsdp_mesh(self) -> DeviceMesh:
        """The mesh FSDP shards over: dp_shard (x cp: context-parallel ranks hold the same
        parameters and average their gradients like data-parallel ones), with dp_replicate in front
        for HSDP."""
        cp = self.world["cp"].size() > 1
        if self.world["dp_replicate"].size() > 1:
            return self.world["dp_replicate", "dp_shard_cp" if cp else "dp_shard"]
        return self.dp_shard_cp if cp else self.world["dp_shard"]


def build_mesh(dims: ParallelDims, device_type: str) -> ParallelMesh | None:
    """None when not distributed: single-process runs need no collectives."""
    if not dist.is_initialized():
        return None
    world = init_device_mesh(device_type, dims.sizes(), mesh_dim_names=MESH_DIMS)
    dp = world["dp_replicate", "dp_shard"]._flatten("dp")
    dp_cp = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
    dp_shard_cp = world["dp_shard", "cp"]._flatten("dp_shard_cp")
    mesh = ParallelMesh(world=world, dp=dp, dp_cp=dp_cp, dp_shard_cp=dp_shard_cp)
    if dims.ep > 1:
        mesh.ep, mesh.efsdp = expert_meshes(mesh, dims.ep)
    return mesh


def expert_meshes(mesh: ParallelMesh, ep: int) -> tuple[DeviceMesh, DeviceMesh]:
    """(ep, efsdp): dp_shard x cp unflattened into efsdp x ep, ep innermost (cp peers, then
    neighbouring dp_shard ranks, exchange tokens); efsdp gets dp_replicate in front for HSDP. Both
    share the world mesh as root, as FSDP2 needs to compose them."""
    if not hasattr(DeviceMesh, "_unflatten"):
        raise RuntimeError("parallel.ep > 1 needs DeviceMesh._unflatten, which this torch lacks; upgrade torch or "
                           "set parallel.ep=1")
    size = mesh.dp_shard_cp.size()
    if mesh.world["dp_replicate"].size() > 1:
        sparse = mesh.world["dp_replicate", "dp_shard_cp"]._unflatten(1, (size // ep, ep), ("efsdp", "ep"))
        return sparse["ep"], sparse["dp_replicate", "efsdp"]
    sparse = mesh.dp_shard_cp._unflatten(0, (size // ep, ep), ("efsdp", "ep"))
    return sparse["ep"], sparse["efsdp"]
