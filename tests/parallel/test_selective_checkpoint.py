"""Selective activation checkpointing (train.ac_mode=selective): same loss and gradients as no
checkpointing and as full checkpointing, and in backward it recomputes no matmul (full
checkpointing recomputes every forward matmul) and, under expert parallelism, repeats no
all-to-all."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from free_port import free_port
from parallel.activation_checkpoint import apply_activation_checkpointing
from pretrain.model import build_model
from pretrain.model.parallelize import parallelize_hybrid


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def run(mode: str | None):
    torch.manual_seed(0)
    model = build_model("hybrid_moe", "tiny")  # Mamba2, intra-hybrid (attention + SSD) and MoE blocks
    if mode is not None:
        apply_activation_checkpointing(model.blocks, mode)
    tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1))
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    with CountOps() as counter:
        loss.backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in model.named_parameters()}
    return loss.detach(), grads, counter.counts


def test_selective_equals_none_and_full_and_recomputes_no_matmul():
    results = {mode: run(mode) for mode in (None, "full", "selective")}
    loss, grads, counts = results[None]
    for mode in ("full", "selective"):
        other_loss, other_grads, _ = results[mode]
        torch.testing.assert_close(other_loss, loss, rtol=0, atol=0)
        assert other_grads.keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(other_grads[name], g, rtol=1e-6, atol=1e-8, msg=f"{mode}: {name}")
    matmuls = {mode: sum(c[op] for op in ("mm", "bmm", "addmm")) for mode, (_, _, c) in results.items()}
    assert matmuls["selective"] == matmuls[None] < matmuls["full"], matmuls
    recomputed = {mode: c["silu"] + c["sigmoid"] + c["rsqrt"] for mode, (_, _, c) in results.items()}
    assert recomputed["selective"] > recomputed[None], recomputed  # the cheap ops are recomputed


def test_selective_with_compile_and_unknown_mode_are_one_line_errors():
    with pytest.raises(ValueError, match="train.ac_mode=selective"):
        parallelize_hybrid(build_model("llama", "tiny"), None, activation_checkpointing=True, compile=True,
                           ac_mode="selective")
    with pytest.raises(ValueError, match="train.ac_mode"):
        apply_activation_checkpointing(build_model("llama", "tiny").blocks, "some")


def count_all_to_alls(ac_mode: str | None) -> dict:
    """One `layout_check.run_cases` case: hybrid_moe at ep=2 (1 expert of 2 per rank); the
    all-to-alls of one forward and of its backward, and the loss."""
    import torch.distributed as dist

    from parallel.mesh import ParallelDims, build_mesh

    torch.manual_seed(0)
    model = build_model("hybrid_moe", "tiny", moe={"n_experts": 2})
    mesh = build_mesh(ParallelDims(ep=2).resolve(dist.get_world_size()), "cpu")
    parallelize_hybrid(model, mesh, activation_checkpointing=ac_mode is not None, ac_mode=ac_mode or "full")
    tokens = torch.randint(0, model.config.vocab_size, (1, 33), generator=torch.Generator().manual_seed(dist.get_rank()))
    with CountOps() as forward:
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    with CountOps() as backward:
        loss.backward()
    return {"loss": loss.item(), **{name: sum(n for op, n in c.counts.items() if "all_to_all" in op or "alltoall" in op)
                                    for name, c in (("forward", forward), ("backward", backward))}}


def all_to_all_worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    from layout_check import run_cases

    run_cases(rank, world, port, cases, out_dir, count_all_to_alls)


@pytest.mark.slow
def test_selective_checkpointing_repeats_no_expert_all_to_all(tmp_path):
    """Full checkpointing reruns each MoE block's forward in backward, all-to-alls included (its
    3 per MoE layer: counts, rows out, rows back); selective keeps their outputs, so its backward
    exchanges only the gradients, as without checkpointing."""
    import json

    import torch.multiprocessing as mp

    cases = [(str(mode), mode) for mode in (None, "full", "selective")]
    mp.spawn(all_to_all_worker, args=(2, free_port(), cases, str(tmp_path)), nprocs=2)
    results = json.loads((tmp_path / "results.json").read_text())
    assert all("error" not in r for r in results.values()), results
    none, full, selective = (results[str(mode)] for mode in (None, "full", "selective"))
    assert none["loss"] == full["loss"] == selective["loss"]
    assert none["forward"] == full["forward"] == selective["forward"] > 0
    assert selective["backward"] == none["backward"] > 0, results
    assert full["backward"] == none["backward"] + none["forward"], results
