"""Tiny trained checkpoints for the evaluation tests: one dense hybrid and one MoE hybrid, trained by
`pretrain/main.py` on the byte-tokenized stdlib corpus (the suite-wide `corpus` fixture)."""
from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import train_tiny


@pytest.fixture(scope="session")
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """arch -> run dir of a finished tiny run (checkpoint and summary.json with the final val NLL)."""
    root = tmp_path_factory.mktemp("eval_runs")
    return {arch: train_tiny(root / arch, corpus, arch) for arch in ("inter_hybrid", "hybrid_moe")}
