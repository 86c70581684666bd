"""init_sharded: a model built on meta, wrapped and sharded, then materialised one module at a time
has exactly the weights (and buffers) of an eager build from the same seed."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.distributed import destroy_distributed
from parallel.fsdp import apply_fsdp
from free_port import free_port
from parallel.init import InitMismatchError, init_sharded
from parallel.mesh import ParallelDims, build_mesh
from pretrain.model import build_model

WRAPPER = "_checkpoint_wrapped_module."


def eager(arch: str, **overrides) -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    model = build_model(arch, "tiny", **overrides)
    return {**model.state_dict(), **dict(model.named_buffers())}


def materialised(arch: str, wrap=lambda model: None, **overrides) -> torch.nn.Module:
    torch.manual_seed(7)
    model = build_model(arch, "tiny", device="meta", **overrides)
    wrap(model)
    init_sharded(model, build_model(arch, "tiny", device="meta", **overrides), "cpu")
    return model


@pytest.mark.parametrize("arch,overrides", [("hybrid_moe", {}), ("llama", {"tie_embeddings": False}),
                                            ("swa", {})])
def test_unsharded_wrapped_model_equals_eager_build(arch, overrides):
    model = materialised(arch, lambda m: apply_activation_checkpointing(m.blocks), **overrides)
    got = {k.replace(WRAPPER, ""): v for k, v in {**model.state_dict(), **dict(model.named_buffers())}.items()}
    ref = eager(arch, **overrides)
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(got[name], value), name


def init_and_save(rank: int, world: int, replicate: int, out: str) -> None:
    mesh = build_mesh(ParallelDims(dp_replicate=replicate).resolve(world), "cpu").fsdp_mesh()
    model = materialised("hybrid_moe", lambda m: apply_fsdp(m, m.blocks.values(), mesh))
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    state = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    state.update(model.named_buffers())
    torch.manual_seed(rank)  # ranks that draw differently must be caught
    model = build_model("hybrid_moe", "tiny", device="meta")
    apply_fsdp(model, model.blocks.values(), mesh)
    try:
        init_sharded(model, build_model("hybrid_moe", "tiny", device="meta"), "cpu")
        mismatch = "not detected"
    except InitMismatchError as e:
        mismatch = str(e)
    if rank == 0:
        torch.save({"state": state, "local_fraction": local / total, "mismatch": mismatch}, out)


def worker(rank: int, world: int, replicate: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        init_and_save(rank, world, replicate, out)
    finally:
        destroy_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("world,replicate", [(2, 1), (4, 2)])  # FSDP; HSDP (Replicate, Shard) on 2x2
def test_sharded_init_equals_eager_build_and_holds_its_shard(tmp_path, world, replicate):
    out = tmp_path / "init.pt"
    port = free_port()
    mp.spawn(worker, args=(world, replicate, port, str(out)), nprocs=world, join=True)
    got = torch.load(out)
    assert "ranks drew different initial weights" in got["mismatch"]
    assert got["local_fraction"] < 0.52  # each rank keeps its shard only (dim-0 chunks, some uneven)
    ref = eager("hybrid_moe")
    assert got["state"].keys() == ref.keys()
    for name, value in ref.items():
        assert torch.equal(got["state"][name], value), name


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)

    def init_plan(self):
        return [(self.a, self.a.reset_parameters)]  # forgets b


def test_a_tensor_outside_the_plan_is_an_error():
    with torch.device("meta"):
        model, template = TwoLinears(), TwoLinears()
    with pytest.raises(RuntimeError, match=r"no init_plan step covers \['b.bias', 'b.weight'\]"):
        init_sharded(model, template, "cpu")

