"""Per-token negative log-likelihood without materialising [batch, length, vocab] fp32 logits
(at 24K positions and a 128K vocabulary that would be 12 GiB per sequence)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.packed import PackedDocs

LOGIT_CHUNK = 1024  # positions per head matmul


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast like training; fp32 runs as is."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def token_nll(model, inputs: Tensor, targets: Tensor, doc_starts: Tensor | None = None) -> Tensor:
    """NLL in nats of each target token [b, l] (fp32), the head applied chunk by chunk.
    `doc_starts` [b, l] (True at each document's first input token): rows of packed documents
    scored with document masking, each document as if alone."""
    docs = PackedDocs.from_starts(doc_starts) if doc_starts is not None else None
    hidden = model.hidden_states(inputs, positions=docs)
    out = torch.empty(targets.shape, dtype=torch.float32, device=targets.device)
    for start in range(0, hidden.shape[1], LOGIT_CHUNK):
        sl = slice(start, start + LOGIT_CHUNK)
        logits = model.head(hidden[:, sl]).float()
        out[:, sl] = F.cross_entropy(logits.transpose(1, 2), targets[:, sl], reduction="none")
    return out
