"""apply_fsdp over a gloo mesh: 2 ranks give the single-process update; extra entry points gather."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from free_port import free_port
from parallel.distributed import destroy_distributed
from parallel.fsdp import apply_fsdp
from parallel.mesh import ParallelDims, build_mesh

pytestmark = pytest.mark.slow


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(3))

    def hidden(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return x

    def forward(self, tokens):
        return self.hidden(tokens) @ self.embed.weight.t()

    def loss(self, tokens):  # an entry point that bypasses forward(), like HybridLM.loss
        logits = self.hidden(tokens[:, :-1]) @ self.embed.weight.t()
        return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train_steps(model, batches, rank=0, world=1):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for tokens in batches:
        rows = tokens.shape[0] // world
        model.loss(tokens[rank * rows:(rank + 1) * rows]).backward()
        opt.step()
        opt.zero_grad()


def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 32, (4, 9), generator=g) for _ in range(3)]


def train_and_save(rank, world, out):
    mesh = build_mesh(ParallelDims().resolve(world), "cpu")
    assert mesh.dp_coordinate() == (rank, world)
    torch.manual_seed(0)
    model = Net()
    apply_fsdp(model, model.blocks, mesh.fsdp_mesh(), forward_methods=("loss",))
    train_steps(model, batches(), rank, world)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(full, out)


def worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train_and_save(rank, world, out)
    finally:
        destroy_distributed()  # after the model's frame is gone: see destroy_distributed


def test_two_rank_fsdp_matches_single_process(tmp_path):
    torch.manual_seed(0)
    ref = Net()
    train_steps(ref, batches())
    out = tmp_path / "fsdp.pt"
    port = free_port()
    mp.spawn(worker, args=(2, port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    for name, value in ref.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6)
