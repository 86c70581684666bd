"""Selective activation checkpointing (train.ac_mode=selective): same loss and gradients as no
checkpointing and as full checkpointing, and in backward it recomputes no matmul (full
checkpointing recomputes every forward matmul)."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
