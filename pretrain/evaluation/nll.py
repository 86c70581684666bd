"""`nll` suite: next-token NLL (nats/token) and bits per byte on a prepared split.

With `document_masking` (a run trained with data.document_masking) every packed document is
scored as if alone. Bits per byte divide the summed NLL by the UTF-8 bytes the target tokens stand for
(`Tokenizer.token_bytes`: special tokens count zero; a character split between tokens, or between
rows, counts its own bytes once), so models with different tokenizers compare on the same text.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loader import build_val_loader
from data_pipeline.tokenizer import Tokenizer
from pretrain.evaluation.scoring import autocast, token_nll
from pretrain.hf import CliError
from pretrain.model.packed import without_unneeded_starts


def _batches(data_dir: Path, seq_len: int, batch_size: int, max_batches: int | None, document_masking: bool):
    return build_val_loader([(str(data_dir), 1.0)], seq_len, batch_size, max_batches=max_batches,
                            emit_doc_boundaries=document_masking)


def _too_little(data_dir: Path, seq_len: int, batch_size: int) -> CliError:
    return CliError(f"{data_dir}: the validation split holds less than one batch of {batch_size} x {seq_len} "
                    "tokens; lower --batch-size/--seq-len or prepare with a larger --val-fraction")


def check_nll_data(data_dir: Path, seq_len: int, batch_size: int, document_masking: bool = False) -> None:
    """The split fills at least one batch (checked at start: `run_nll` would find out after the
    suites before it)."""
    if next(iter(_batches(data_dir, seq_len, batch_size, 1, document_masking)), None) is None:
        raise _too_little(data_dir, seq_len, batch_size)


def run_nll(model, data_dir: Path, tokenizer: Tokenizer, seq_len: int, batch_size: int,
            max_batches: int | None, device: torch.device, dtype: torch.dtype,
            document_masking: bool = False) -> dict[str, Any]:
    loader = _batches(data_dir, seq_len, batch_size, max_batches, document_masking)
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64)
    total, tokens_scored, n_bytes, batches = 0.0, 0, 0, 0
    for batch in loader:
        batch = without_unneeded_starts(batch)  # doc_starts only under document_masking, and where needed
        tokens = batch["tokens"].to(device)
        starts = batch["doc_starts"][:, :-1].to(device) if "doc_starts" in batch else None
        with autocast(device, dtype):
            nll = token_nll(model, tokens[:, :-1], tokens[:, 1:], starts)
        total += float(nll.double().sum())
        tokens_scored += nll.numel()
        n_bytes += int(token_bytes[batch["tokens"][:, 1:]].sum())
        batches += 1
    if tokens_scored == 0:
        raise _too_little(data_dir, seq_len, batch_size)
    return {"data": str(data_dir), "seq_len": seq_len, "document_masking": document_masking, "batches": batches,
            "tokens": tokens_scored,
            "bytes": n_bytes, "nll": total / tokens_scored,
            "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None}
