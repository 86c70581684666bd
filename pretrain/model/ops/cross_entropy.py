"""Cross-entropy of `hidden @ weight.T` over a large vocabulary without materialising all logits.

Under tensor parallelism (`group` given) `weight` is this rank's slice of the vocabulary rows,
starting at `vocab_start`: the softmax's max and normaliser and the target's logit are all-reduced
over the group per chunk (loss parallelism: full logits never exist on any rank), each rank's
weight gradient is its own rows', and its hidden gradient is its part of a sum over the group.

Rows are processed in chunks; each chunk's gradients (w.r.t. hidden and weight) are computed in
the forward pass, right after its logits, and the logits are freed. A chunk holds about
`CHUNK_LOGITS` logits whatever the vocabulary (1,024 rows at 128K: ~1.3 GiB of temporaries at
peak, where [16K tokens, 128K] fp32 logits would be 8 GB), and nothing is recomputed in backward.
On CUDA without TP a chunk's loss and logit gradient come from one Triton kernel
(`softmax_xent_triton`) that writes the gradient over the 16-bit logits, so a chunk holds
`KERNEL_CHUNK_LOGITS` (4,096 rows at 128K: 1 GiB).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.precision import wide
from pretrain.model.ops.softmax_xent_triton import kernel_applies, softmax_xent

CHUNK_LOGITS = 1 << 27  # logits per chunk on the PyTorch path (~10 bytes of temporaries per logit)
# On the Triton path a chunk's only temporary is its 16-bit logits: 4x larger chunks in about the same
# memory, and 4x fewer fp32 passes over the head's weight gradient (H200, 16K rows x 128K: 47.9 -> 44.9 ms)
KERNEL_CHUNK_LOGITS = 1 << 29


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`, full logits in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def _log_softmax(logits: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """log_softmax over the last dim, which is split over `group` when one is given."""
    if group is None:
        return logits.log_softmax(-1)
    peak = logits.max(-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted = logits - peak
    norm = shifted.exp().sum(-1, keepdim=True)
    dist.all_reduce(norm, group=group)
    return shifted - norm.log()


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b. On CUDA with 16-bit inputs cuBLAS adds the fp32 product into `acc` itself: no
    16-bit product, no cast and no separate add over a [vocab, d] tensor per chunk."""
    if acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int, ignore_index: int,
                needs_grad: bool, group: dist.ProcessGroup | None, vocab_start: int) -> Tensor:
        valid = targets != ignore_index
        work = wide(hidden[:0]).dtype  # fp32, or fp64 for an fp64 model
        count = valid.sum().clamp(min=1)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=work) if needs_grad else None
        total = hidden.new_zeros((), dtype=work)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t, v = (a[start:start + chunk_rows] for a in (hidden, targets, valid))
            logits = h @ weight.t()
            if group is None:  # one kernel: loss per row, and the logits become their scaled gradient
                total += softmax_xent(logits, t.where(v, -1), 1 / count, grad=needs_grad).sum()
                g = logits
            else:
                # this rank's rows of the vocabulary: the target logit is in its slice for some rows only.
                # No boolean indexing: a host sync per chunk would stall the GPU's queue.
                t = t - vocab_start
                mine = v & (t >= 0) & (t < weight.shape[0])
                target, keep = t.where(mine, 0).unsqueeze(1), v.unsqueeze(1).to(work)
                log_probs = _log_softmax(wide(logits), group)
                total -= log_probs.gather(1, target).squeeze(1).where(mine, 0).sum()
                if needs_grad:  # d(sum CE)/d logits = softmax - onehot, zero on ignored rows
                    onehot = mine.unsqueeze(1).to(work)
                    g = log_probs.exp_().scatter_add_(1, target, -onehot).mul_(keep / count).to(logits.dtype)
                del log_probs
            del logits
            if needs_grad:
                grad_hidden[start:start + chunk_rows] = g @ weight.to(g.dtype)
                _accumulate_product(grad_weight, g.t(), h.to(g.dtype))
                del g  # free this chunk's temporaries before the next chunk's logits
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        if group is not None:
            dist.all_reduce(total, group=group)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, (grad_weight * grad_out).to(ctx.weight_dtype), None, None, None, None, None, None


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None = None,
                          ignore_index: int = -100, group: dist.ProcessGroup | None = None,
                          vocab_start: int = 0) -> Tensor:
    """hidden [..., d], weight [V, d], targets [...] -> mean CE over non-ignored targets.
    Gradients are only computed when autograd will ask for them (not under no_grad / eval).
    `chunk_rows` defaults to CHUNK_LOGITS / V rows (of this rank's slice; KERNEL_CHUNK_LOGITS where the
    Triton step runs). With `group`, weight is rows [vocab_start, vocab_start + V) of the vocabulary
    (see the module docstring)."""
    per_chunk = KERNEL_CHUNK_LOGITS if group is None and kernel_applies(hidden) else CHUNK_LOGITS
    chunk_rows = chunk_rows or max(1, per_chunk // weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                            chunk_rows, ignore_index, needs_grad, group, vocab_start)
