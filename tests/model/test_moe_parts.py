"""MoE parts: routing counted once under activation checkpointing (the recompute in backward routes
again), and state dicts saved before the experts moved into `experts.` still load."""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from pretrain.model.config import MoEConfig
from pretrain.model.moe import MoE


def test_recompute_is_not_counted_and_old_state_dicts_load():
    torch.manual_seed(0)
    moe = MoE(16, 32, MoEConfig(n_experts=4, top_k=2))
    moe.reset_parameters()
    x = torch.randn(2, 8, 16, requires_grad=True)
    checkpoint(moe, x, use_reentrant=False).sum().backward()
    assert int(moe.tokens_per_expert.sum()) == 2 * 8 * 2 and int(moe.tokens_received) == 2 * 8 * 2
    old = {k.replace("experts.", ""): v for k, v in moe.state_dict().items()}
    assert "w1" in old
    again = MoE(16, 32, MoEConfig(n_experts=4, top_k=2))
    again.load_state_dict(old)
    for name, value in moe.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, rtol=0, atol=0)
