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
`KERNEL_CHUNK_BYTES` of them (4,185 bf16 rows at 128K: 1 GiB).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.ops.precision import compute_dtype, wide, wide_dtype
from pretrain.model.ops.softmax_xent_triton import kernel_applies, softmax_xent, xent_from_log_probs

CHUNK_LOGITS = 1 << 27  # logits per chunk on the PyTorch path (~10 bytes of temporaries per logit)
# On the Triton path a chunk's only temporary is its logits in the compute dtype: 1 GiB holds 2^29 bf16
# logits (4,185 rows at 128K), about the PyTorch path's temporaries, and 4x fewer fp32 passes over the
# head's weight gradient than 2^27 (H200, 16K rows x 128K, bf16: 47.9 -> 44.9 ms per step's loss)
KERNEL_CHUNK_BYTES = 1 << 30


def even_chunk_rows(rows: int, budget: int) -> int:
    """Rows per chunk for `rows` split into equal chunks of at most `budget` rows (16K rows with a
    4,185-row budget: 4 x 4,096, not 3 x 4,185 and a 3,829 remainder), rounded up to GEMM tiles of
    128 rows where that stays within the budget. At least 1 (no rows: no chunk runs)."""
    budget = max(1, budget)
    if rows <= budget:
        return max(1, rows)
    per_chunk = -(-rows // -(-rows // budget))
    aligned = -(-per_chunk // 128) * 128
    return aligned if aligned <= budget else per_chunk


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`, full logits in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def _vocab_parallel_xent(logits: Tensor, targets: Tensor, valid: Tensor, scale: Tensor, vocab_start: int,
                         group: dist.ProcessGroup, grad: bool) -> Tensor:
    """`softmax_xent` when `logits` are this rank's columns [vocab_start, vocab_start + V) of the
    vocabulary: the max and the normaliser are all-reduced over `group`, and the target logit is in
    this rank's slice for some rows only (their losses sum over the group). No boolean indexing: a host
    sync per chunk would stall the GPU's queue."""
    t = targets - vocab_start
    mine = valid & (t >= 0) & (t < logits.shape[1])
    shifted = wide(logits)
    peak = shifted.max(-1, keepdim=True).values
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    shifted -= peak
    norm = shifted.exp().sum(-1, keepdim=True)
    dist.all_reduce(norm, group=group)
    return xent_from_log_probs(logits, shifted.sub_(norm.log()), t.where(mine, -1), valid, scale, grad)


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b, in place (no product-sized temporary). On CUDA with 16-bit inputs cuBLAS adds the
    fp32 product into `acc` itself: no 16-bit product, no cast and no separate add over a [vocab, d]
    tensor per chunk."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and acc.dtype == torch.float32 and a.dtype == b.dtype in (torch.bfloat16, torch.float16):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int | None, ignore_index: int,
                needs_grad: bool, group: dist.ProcessGroup | None, vocab_start: int) -> Tensor:
        valid = targets != ignore_index
        dtype = compute_dtype(hidden, weight)  # the GEMMs'
        work = wide_dtype(dtype)  # the sums' and the weight gradient's: fp32, or fp64 for an fp64 model
        count = valid.sum().clamp(min=1)
        scale = 1 / count.to(work)
        if not chunk_rows:
            fast = group is None and kernel_applies(hidden.device, dtype)
            budget = (KERNEL_CHUNK_BYTES // dtype.itemsize if fast else CHUNK_LOGITS) // weight.shape[0]
            chunk_rows = even_chunk_rows(hidden.shape[0], budget)
        w = weight.to(dtype)  # once (autocast would cast it for every chunk's GEMMs)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros_like(weight, dtype=work) if needs_grad else None
        total = hidden.new_zeros((), dtype=work)
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t, v = (a[start:start + chunk_rows] for a in (hidden, targets, valid))
            h = h.to(dtype)
            logits = h @ w.t()
            # the rows' losses; the logits become their scaled gradient (one kernel without TP)
            if group is None:
                rows = softmax_xent(logits, t.where(v, -1), scale, grad=needs_grad)
            else:
                rows = _vocab_parallel_xent(logits, t, v, scale, vocab_start, group, needs_grad)
            total += rows.sum()
            if needs_grad:
                grad_hidden[start:start + chunk_rows] = logits @ w
                _accumulate_product(grad_weight, logits.t(), h)
            del logits  # free this chunk's temporaries before the next chunk's logits
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
    `chunk_rows` defaults to equal chunks of at most CHUNK_LOGITS / V rows (V: this rank's slice;
    KERNEL_CHUNK_BYTES of logits where the Triton step runs), see `even_chunk_rows`. With `group`,
    weight is rows [vocab_start, vocab_start + V) of the vocabulary
    (see the module docstring)."""
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _ChunkedLinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, targets.reshape(-1),
                                            chunk_rows, ignore_index, needs_grad, group, vocab_start)
