"""Cross-entropy of `hidden @ weight.T` over a large vocabulary without materialising all logits.

Rows are processed in chunks; each chunk's gradients (w.r.t. hidden and weight) are computed in
the forward pass, right after its logits, and the logits are freed. Peak memory holds one chunk of
logits instead of [tokens, 128K] in fp32, and nothing is recomputed in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`, full logits in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, ignore_index: int,
                needs_grad: bool) -> Tensor:
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t, v = (a[start:start + chunk_rows] for a in (hidden, targets, valid))
            logits = (h @ weight.t()).float()
            total += F.cross_entropy(logits, t, ignore_index=ignore_index, reduction="sum")
            if needs_grad:  # d(sum CE)/d logits = softmax - onehot, zero on ignored rows
                g = logits.softmax(-1)
                rows = v.nonzero().squeeze(1)
                g[rows, t[rows]] -= 1
                g[~v] = 0
                g = (g / count).to(h.dtype)
                grad_hidden[start:start + chunk_rows] = g @ weight.to(h.dtype)
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, (grad_weight * grad_out).to(ctx.weight_dtype), None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 8192,
                          ignore_index: int = -100) -> Tensor:
    """hidden [..., d], weight [V, d], targets [...] -> mean CE over non-ignored targets.
    Gradients are only computed when autograd will ask for them (not under no_grad / eval)."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                            chunk_rows, ignore_index, needs_grad)
