"""One-process mixed precision: parameters cast to bf16 once per step (parallel/mixed_precision.py)
compute what bf16 autocast computes, within bf16 rounding, and leave fp32 masters with fp32 grads."""

import torch

from parallel.activation_checkpoint import apply_activation_checkpointing
from parallel.mixed_precision import cast_parameters
from pretrain.model import build_model


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_cast_once_matches_autocast_within_bf16_tolerance():
    torch.manual_seed(0)
    model = build_model("hybrid_moe", "tiny", pattern="MA")
    tokens = torch.randint(0, model.config.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))

    def run(context, checkpointed=None):
        m = checkpointed or model
        m.zero_grad(set_to_none=True)
        with context():
            loss = m.loss(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in m.parameters() if p.grad is not None]

    loss32, grads32 = run(torch.enable_grad)
    loss_ac, grads_ac = run(lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    loss_cast, grads_cast = run(lambda: cast_parameters(model, torch.bfloat16))
    assert all(p.dtype == torch.float32 for p in model.parameters()), "masters must be restored"
    assert all(g.dtype == torch.float32 for g in grads_cast) and len(grads_cast) == len(grads32)
    assert abs(loss_cast - loss32) / loss32 < 1e-2 and abs(loss_cast - loss_ac) / loss32 < 1e-2
    errs_cast = [rel(a, b) for a, b in zip(grads_cast, grads32)]
    errs_ac = [rel(a, b) for a, b in zip(grads_ac, grads32)]
    # bf16 flips some MoE routing choices either way (both ~0.2 off fp32 there): per parameter,
    # the cast's error is autocast's within bf16 noise (the residual stream is bf16 here)
    for i, (e_cast, e_ac) in enumerate(zip(errs_cast, errs_ac)):
        assert e_cast < 1.5 * e_ac + 0.02, (i, e_cast, e_ac)
    assert sorted(errs_cast)[len(errs_cast) // 2] < 0.02

    # activation checkpointing recomputes inside the same cast: same loss and gradients
    apply_activation_checkpointing(model.blocks)
    loss_ckpt, grads_ckpt = run(lambda: cast_parameters(model, torch.bfloat16), model)
    assert loss_ckpt == loss_cast
    for a, b in zip(grads_ckpt, grads_cast):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cast_swaps_in_bf16_copies_and_restores_the_masters():
    model = build_model("hybrid_moe", "tiny")
    masters = list(model.parameters())
    with cast_parameters(model, torch.bfloat16):
        inside = list(model.parameters())  # plain tensors now: nn.Module.parameters() still lists them
        assert len(inside) == len(masters)
        assert all(t.dtype == torch.bfloat16 and not isinstance(t, torch.nn.Parameter) for t in inside)
    assert all(m.expert_bias.dtype == torch.float32 for m in model.moe_layers())  # buffers are not cast
    after = list(model.parameters())
    assert all(a is b for a, b in zip(after, masters))
