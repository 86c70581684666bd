"""The aligned layout of the fast grouped GEMM (each expert's rows from a multiple of the
alignment) computes what the unpadded reference does, gradients included; empty experts too."""
from __future__ import annotations

import torch

from pretrain.model.ops.grouped_mm import aligned_rows, grouped_mm_reference


def test_aligned_layout_matches_the_reference():
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 9, 1, 0, 8])
    offsets = counts.cumsum(0)
    x = torch.randn(int(counts.sum()), 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(len(counts), 16, 8, dtype=torch.float64, requires_grad=True)
    dest, padded_ends, total = aligned_rows(offsets, x.shape[0], 8)
    starts = torch.cat([padded_ends.new_zeros(1), padded_ends[:-1]])
    assert (starts % 8 == 0).all() and int(padded_ends[-1]) <= total
    assert dest.unique().numel() == x.shape[0]  # rows land on distinct slots
    padded = x.new_zeros(total, 16).index_copy(0, dest, x)
    out = grouped_mm_reference(padded, w, padded_ends)[dest]
    ref = grouped_mm_reference(x, w, offsets)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (x, w))
    ref_grads = torch.autograd.grad(ref.square().sum(), (x, w))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12)
