"""Shared worker for the parallel-layout tests: the same tiny model in 1 process and under a
layout of N gloo processes; loss, every gradient and 3 optimizer steps compared."""
from __future__ import annotations

import copy
import json
import os
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from parallel.context_parallel import shard_index
from parallel.distributed import destroy_distributed
from parallel.mesh import ParallelDims, build_mesh
from pretrain.model import build_model
from pretrain.model.packed import PackedDocs
from pretrain.model.parallelize import parallelize_hybrid

SEQ = 32


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def unwrapped(name: str) -> str:
    """A parameter's name without the compile and checkpoint wrappers' prefixes."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def batch(vocab: int, step: int) -> torch.Tensor:
    return torch.randint(0, vocab, (4, SEQ + 1), generator=torch.Generator().manual_seed(100 + step))


# Document starts of the document-masking cases, per row of `batch`: at cp=2 the shards are chunks
# of 8 (rank 0: 0-7 and 24-31); boundaries on shard edges (8, 16, 24), documents spanning edges,
# documents shorter than the conv width, one longer than the SWA window (16).
DOC_STARTS = [[0, 8, 11, 29, 31], [0, 2, 16, 24], [0, 5, 13, 30], [0, 1, 3, 24]]


def doc_starts(rows: int) -> torch.Tensor:
    starts = torch.zeros(rows, SEQ + 1, dtype=torch.bool)
    for r in range(rows):
        starts[r, DOC_STARTS[r % len(DOC_STARTS)]] = True
    return starts


def compare(arch: str, overrides: dict, dims: ParallelDims, dtype: torch.dtype, steps: int = 3,
            document_masking: bool = False, compile_backend: str | None = None, ac_mode: str | None = None) -> dict:
    """Losses of `steps` AdamW steps and the first step's relative error of every gradient
    (|g - g_ref| / |g_ref|, per tensor); in fp32 also both first-step gradients' errors against the
    fp64 gradient of the same weights and batch (`grad_err`: 1 process, layout), computed here on a
    fp64 copy of the reference; with `document_masking`, over packed documents; with
    `compile_backend`, the parallel model's blocks compiled and checkpointed (the trainer's layout
    under train.compile); with `ac_mode`, its blocks checkpointed that way (eager)."""
    torch.manual_seed(0)
    ref = build_model(arch, "tiny", **overrides).to(dtype)
    model = copy.deepcopy(ref)
    truth = copy.deepcopy(ref).double() if dtype == torch.float32 else None
    mesh = build_mesh(dims.resolve(dist.get_world_size()), "cpu")
    options = {"activation_checkpointing": True, "ac_mode": ac_mode or "full"} if compile_backend or ac_mode else {}
    if compile_backend:
        options.update(compile=True, compile_backend=compile_backend)
    parallelize_hybrid(model, mesh, param_dtype=dtype, reduce_dtype=dtype, **options)
    dp_rank, dp_size = mesh.dp_coordinate()
    cp_rank, cp = mesh.world["cp"].get_local_rank(), mesh.world["cp"].size()
    positions = shard_index(SEQ, cp, cp_rank)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (ref, model)]
    out = {"ref": [], "par": [], "grad_rel": {}}
    for step in range(steps):
        tokens = batch(ref.config.vocab_size, step)
        rows = tokens.shape[0] // dp_size
        mine = tokens[dp_rank * rows:(dp_rank + 1) * rows]
        ref_pos = my_pos = None
        if document_masking:
            starts = doc_starts(tokens.shape[0])[:, :-1]
            ref_pos = PackedDocs.from_starts(starts)
            my_pos = PackedDocs.from_starts(starts[dp_rank * rows:(dp_rank + 1) * rows]).select(positions)
        loss_ref = ref.loss(tokens[:, :-1], tokens[:, 1:], ref_pos)
        loss_ref.backward()
        loss = model.loss(mine[:, :-1][:, positions], mine[:, 1:][:, positions], my_pos or positions)
        loss.backward()
        loss_sum = loss.detach().clone()
        dist.all_reduce(loss_sum, group=mesh.tokens_group())
        out["ref"].append(loss_ref.item())
        out["par"].append(loss_sum.item() / (dp_size * cp))
        if step == 0:
            grads = {unwrapped(n): full(p.grad) for n, p in model.named_parameters()}
            out["grad_rel"] = {n: rel(grads[n], p.grad) for n, p in ref.named_parameters()}
            if truth is not None:  # each fp32 gradient's own error: 1 process's and the layout's
                truth.loss(tokens[:, :-1], tokens[:, 1:], ref_pos).backward()
                exact = dict(truth.named_parameters())
                out["grad_err"] = {n: (rel(p.grad.double(), exact[n].grad), rel(grads[n].double(), exact[n].grad))
                                   for n, p in ref.named_parameters()}
        for opt in opts:
            opt.step()
            opt.zero_grad()
    return out


def run_cases(rank: int, world: int, port: int, cases: list, out_dir: str,
              run_case: Callable[..., dict], every_rank: bool = False) -> None:
    """A gloo process running `run_case(*case)` for each (name, *case) of `cases`, an exception
    reported per case; rank 0 writes results.json (every rank results{rank}.json with `every_rank`).
    A case that fails on one rank leaves the others waiting in a collective: the 10-minute timeout
    (gloo's default is 30) turns that into their error too, well inside CI's limit."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=10))
    torch.set_num_threads(1)
    results = {}
    try:
        for name, *case in cases:
            try:
                results[name] = run_case(*case)
            except Exception:  # noqa: BLE001 - reported by the test, per case
                results[name] = {"error": traceback.format_exc()}
    finally:
        if every_rank or rank == 0:
            Path(out_dir, f"results{rank}.json" if every_rank else "results.json").write_text(json.dumps(results))
        destroy_distributed()


def layout_case(arch: str, overrides: dict, dims: dict, dtype: str, options: dict | None = None) -> dict:
    """One case of `worker`: options (optional) are compare's keywords."""
    return compare(arch, overrides, ParallelDims(**dims), getattr(torch, dtype), **(options or {}))


def worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    run_cases(rank, world, port, cases, out_dir, layout_case)
