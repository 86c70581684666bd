"""Cross-entropy of a chunk of logits and its gradient in one Triton kernel, written over the logits.

`chunked_cross_entropy` needs, per chunk of rows, each row's loss and d loss / d logits. In PyTorch
that is a cast of the 16-bit logits to fp32, a log-softmax, a gather, an exp, a scatter, a scale and
a cast back: seven passes over a [rows, vocab] tensor, twice its size in fp32 (on an H200, 16K rows at
vocab 128K: 87.5 ms for the whole loss forward and backward, 64.9 with this kernel; docs/benchmarks.md,
"The loss kernel"). Here one program per row reads its logits twice (an
online max / sum, then the gradient) in fp32 registers and writes the gradient over them in their own
dtype. `softmax_xent_reference` is the same computation in PyTorch: the CPU path and the GPU test's
oracle.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from pretrain.model.ops.library import has_triton
from pretrain.model.ops.precision import wide

BLOCK = 4096  # vocabulary entries per loop iteration of a row's program


def softmax_xent_reference(logits: Tensor, targets: Tensor, scale: Tensor, grad: bool = True) -> Tensor:
    """logits [rows, V], targets [rows] (a negative target: the row is ignored), scale: a 0-dim tensor.
    Returns each row's CE (wide dtype, 0 on ignored rows); with `grad`, logits become
    scale * d CE / d logits (softmax - onehot, 0 on ignored rows), in their own dtype."""
    return xent_from_log_probs(logits, wide(logits).log_softmax(-1), targets, targets >= 0, scale, grad)


def xent_from_log_probs(logits: Tensor, log_probs: Tensor, targets: Tensor, counted: Tensor, scale: Tensor,
                        grad: bool) -> Tensor:
    """The reference's second half, shared with the vocabulary-parallel loss (`cross_entropy.py`): each
    row's CE from its log-probabilities, 0 where the target is negative (ignored, or under TP in another
    rank's columns); with `grad`, logits become scale * (softmax - onehot) on the `counted` rows, 0 on
    the others. Consumes `log_probs`."""
    hit = targets >= 0
    target = targets.clamp(min=0).unsqueeze(1)
    loss = -log_probs.gather(1, target).squeeze(1).where(hit, 0)
    if grad:
        g = log_probs.exp_().scatter_add_(1, target, -hit.unsqueeze(1).to(log_probs.dtype))
        logits.copy_(g.mul_(counted.unsqueeze(1).to(g.dtype) * scale))
    return loss


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def softmax_xent_rows(logits_ptr, row_stride, targets_ptr, loss_ptr, scale_ptr, VOCAB: tl.constexpr,
                          GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * row_stride
        target = tl.load(targets_ptr + row)
        cols = tl.arange(0, BLOCK)
        peak = tl.full((), float("-inf"), tl.float32)
        norm = tl.full((), 0.0, tl.float32)
        for start in range(0, VOCAB, BLOCK):  # online softmax: running max and sum of exp below it
            x = tl.load(ptr + start + cols, mask=start + cols < VOCAB, other=float("-inf")).to(tl.float32)
            new_peak = tl.maximum(peak, tl.max(x, 0))
            # while every logit so far is -inf (masked), -inf - -inf would make the sum NaN: shift by 0
            shift = tl.where(new_peak == float("-inf"), 0.0, new_peak)
            norm = norm * tl.exp(peak - shift) + tl.sum(tl.exp(x - shift), 0)
            peak = new_peak
        lse = peak + tl.log(norm)
        keep = target >= 0
        target_logit = tl.load(ptr + tl.maximum(target, 0)).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(keep, lse - target_logit, 0.0))
        if GRAD:
            scale = tl.where(keep, tl.load(scale_ptr), 0.0)
            for start in range(0, VOCAB, BLOCK):
                mask = start + cols < VOCAB
                x = tl.load(ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
                tl.store(ptr + start + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)

    return softmax_xent_rows


def softmax_xent_triton(logits: Tensor, targets: Tensor, scale: Tensor, grad: bool = True) -> Tensor:
    """`softmax_xent_reference` on the GPU (logits' rows contiguous; fp32 loss). Targets must be
    below the vocabulary size, as the reference's `gather` demands: the kernel does not check (a
    larger one reads another row); the data pipeline checks every token id against the vocabulary."""
    assert logits.stride(1) == 1, "the kernel reads each row as contiguous memory"
    loss = torch.empty(logits.shape[0], device=logits.device, dtype=torch.float32)
    _kernel()[(logits.shape[0],)](logits, logits.stride(0), targets.contiguous(), loss, scale.float(),
                                  VOCAB=logits.shape[1], GRAD=grad, BLOCK=BLOCK, num_warps=16)
    return loss


def kernel_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether logits of `dtype` on `device` take the kernel: CUDA, 16 or 32 bits, Triton installed."""
    return device.type == "cuda" and dtype != torch.float64 and has_triton()


def softmax_xent(logits: Tensor, targets: Tensor, scale: Tensor, grad: bool = True) -> Tensor:
    """The kernel where `kernel_applies`, the reference otherwise."""
    if kernel_applies(logits.device, logits.dtype):
        return softmax_xent_triton(logits, targets, scale, grad)
    return softmax_xent_reference(logits, targets, scale, grad)
