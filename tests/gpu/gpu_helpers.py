"""Comparisons shared by the GPU tests (fast paths against their references)."""
import torch


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of `a` against the reference `b`, in fp32 (bf16 norms would round)."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
