"""Expert parallelism on gloo against the same model in one process (loss, every gradient, 3 AdamW
steps): ep=2 alone, ep=2 with the experts FSDP-sharded over the other 2 data ranks (efsdp), and
ep=2 x tp=2 (routed experts replicated over TP, shared expert TP-sharded)."""
from __future__ import annotations

import pytest
from test_model_parallel_layouts import KV2, cases, check, run

pytestmark = pytest.mark.slow

MOE = [("hybrid_moe", {"intra": KV2}), ("llama_moe", {"moe": {"top_k": 2}})]


def test_ep2_matches_one_process(tmp_path):
    check(run(2, cases({"ep": 2}, "float64", MOE) + cases({"ep": 2}, "float32", MOE[:1]), tmp_path))


def test_ep2_with_fsdp_and_tp_matches_one_process(tmp_path):
    check(run(4, cases({"ep": 2}, "float64", MOE) + cases({"ep": 2, "tp": 2}, "float64", MOE)
              + cases({"ep": 2, "tp": 2}, "float32", MOE[:1]), tmp_path))
