"""`positions` suite: loss per token position out to a multiple of the training length (the paper:
PG19 to 24K after 8K training), which shows where each architecture stops extrapolating."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.evaluation.documents import document_split, long_windows
from pretrain.evaluation.scoring import autocast, token_nll

BINS = 64  # positions are reported as this many equal-width bins (the full curve would bloat the JSON)


def run_positions(model, data_dir: Path, train_seq_len: int, length: int, docs: int,
                  device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Mean NLL per position over `docs` windows of `length` tokens (BOS first)."""
    windows, source = long_windows(data_dir, length, docs)
    total = np.zeros(length)
    for row in windows:  # one sequence at a time: memory stays that of a single long forward
        tokens = torch.from_numpy(row).unsqueeze(0).to(device)
        with autocast(device, dtype):
            total += token_nll(model, tokens[:, :-1], tokens[:, 1:])[0].double().cpu().numpy()
    per_pos = total / len(windows)
    edges = np.linspace(0, length, min(BINS, length) + 1).round().astype(int)
    inside, beyond = per_pos[:train_seq_len], per_pos[train_seq_len:]
    return {"data": str(data_dir), "split": document_split(data_dir), "source": source, "docs": len(windows),
            "length": length,
            "train_seq_len": train_seq_len,
            "bin_start": edges[:-1].tolist(), "bin_end": edges[1:].tolist(),
            "bin_nll": [float(per_pos[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])],
            "nll_within_train_length": float(inside.mean()),
            "nll_beyond_train_length": float(beyond.mean()) if beyond.size else None}
