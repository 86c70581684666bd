"""Expert parallelism on gloo against the same model in one process (loss, every gradient, 3 AdamW
steps), in one 4-rank launch: ep=4 (each rank 2 of the 8 experts), ep=2 with the experts
FSDP-sharded over the other 2 data ranks (efsdp), ep=2 inside each HSDP replica, ep=2 over the 2 cp ranks
(each routes its own sequence shard) and ep=2 x tp=2 (routed experts replicated over TP, shared
expert TP-sharded); top-1 hybrid_moe, and at ep=2 x efsdp=2
also top-2 llama_moe and 2 experts (1 per ep rank: FSDP shards it on another dim than the experts),
and hybrid_moe under selective checkpointing (the experts' FSDP unit inside the checkpointed block)."""
from __future__ import annotations

import pytest
from test_model_parallel_layouts import KV2, cases, check, run

pytestmark = pytest.mark.slow

MOE = [("hybrid_moe", {"intra": KV2}), ("llama_moe", {"moe": {"top_k": 2}}), ("hybrid_moe", {"moe": {"n_experts": 2}})]


def test_ep_alone_with_fsdp_hsdp_and_tp_matches_one_process(tmp_path):
    layouts = [{"ep": 4}, {"dp_replicate": 2, "ep": 2}, {"cp": 2, "ep": 2}, {"ep": 2, "tp": 2}]
    selective = cases({"ep": 2}, "float64", MOE[:1], {"ac_mode": "selective"})
    check(run(4, cases({"ep": 2}, "float64", MOE) + [c for dims in layouts for c in cases(dims, "float64", MOE[:1])]
              + cases({"ep": 2, "tp": 2}, "float32", MOE[:1]) + selective, tmp_path))
