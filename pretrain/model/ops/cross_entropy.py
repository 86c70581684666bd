"""Cross-entropy over a large vocabulary without materialising all fp32 logits at once.

Rows are processed in chunks; each chunk's logits are recomputed in backward (activation
checkpointing), so peak memory holds one chunk of logits, not [tokens, 128K].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


def cross_entropy_reference(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean CE of `hidden @ weight.T` against `targets`, full logits in fp32."""
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=ignore_index)


def _chunk_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_rows: int = 8192,
                          ignore_index: int = -100) -> Tensor:
    """hidden [..., d], weight [V, d], targets [...] -> mean CE over non-ignored targets."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if hidden.shape[0] <= chunk_rows:
        total = _chunk_loss_sum(hidden, weight, targets, ignore_index)
    else:
        total = sum(
            checkpoint(_chunk_loss_sum, h, weight, t, ignore_index, use_reentrant=False)
            for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows)))
    return total / (targets != ignore_index).sum().clamp(min=1)
