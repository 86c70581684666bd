"""Process-group set-up from whichever launcher started us (torchrun, Slurm srun, or nothing).

The launch scripts (launch/) start one torchrun per node, which sets the torchrun variables; a
bare `srun python pretrain/main.py` (one task per GPU) works too, its SLURM_* variables translated.
"""
from __future__ import annotations

import gc
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_from_slurm() -> None:
    """Translate srun's task variables into the torchrun names torch.distributed reads."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_NTASKS" not in os.environ:
        return
    if int(os.environ["SLURM_NTASKS"]) <= 1:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               check=True, capture_output=True, text=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", "29500")


def init_distributed(device_type: str | None = None) -> DistInfo:
    """Initialise the default process group when launched with several ranks; no-op for one.

    device_type None picks cuda when available. NCCL serves CUDA, gloo serves CPU.
    """
    _env_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        # gloo beside NCCL serves CPU-side collectives (async checkpoint saves need one).
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=device if device_type == "cuda" else None)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    """Collect garbage first: reference cycles (FSDP state <-> modules) that still hold gloo
    work objects would otherwise be freed during interpreter shutdown, where gloo aborts the
    process ("terminate called without an active exception") in a few percent of exits."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_scalar(value: float, op: str = "sum", device: torch.device | None = None) -> float:
    """Reduce one Python number over all ranks (identity when not distributed)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    dist.all_reduce(t, op=reduce_op)
    return float(t.item())


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Sum `tensor` in place over `group` (the world when None); identity when not distributed.
    Callers pack what they need into one tensor, so a step pays one collective, not one per item."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def new_cpu_group() -> dist.ProcessGroup | None:
    """A gloo group over all ranks for work in a background thread (async checkpoint saves): it
    keeps that thread's collectives from interleaving with the training loop's on the default
    group. Collective: every rank calls it, in the same order. None when not distributed."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


def all_gather_objects(obj: object) -> list[object]:
    """Gather one picklable object from every rank, in rank order, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """`src`'s picklable object on every rank (for decisions one rank must make for all)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
